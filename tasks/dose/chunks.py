"""Dose read one chunk of frames at a time: raw float64 or RTDOSE pixels, summed, checked, quantised.

Grids can be 400^3 and more, so inputs are read through np.memmap one chunk of frames
at a time in two passes: the maximum (which fixes the scaling), then quantisation into a
reused uint16 chunk. Neither a full float64 copy nor a full pixel buffer is ever held.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from tasks.dose.model import PIXEL_DATA_TAG, RtDoseError

_CHUNK_BYTES = 2 << 20  # float64 bytes per chunk of frames: cache-sized, few memmap calls
_INF_BITS = np.float64(np.inf).view(np.uint64)


@dataclass(frozen=True)
class DoseSource:
    """One input dose file read by frame chunks through np.memmap.

    Raw engine output is float64, `scale` Gy per unit (the calibration), and is checked
    for negative and non-finite values; RTDOSE pixel data is unsigned and scaled by its
    DoseGridScaling.
    """

    path: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, int, int]
    scale: float
    is_raw: bool

    def frames(self, k0: int, k1: int) -> np.ndarray:
        frame_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        return np.memmap(
            os.fspath(self.path),  # a str: numpy calls Path.resolve() (syscalls) on a Path
            dtype=self.dtype,
            mode="r",
            offset=self.offset + k0 * frame_bytes,
            shape=(k1 - k0, *self.shape[1:]),
        )


def chunks(shape: tuple[int, int, int]) -> Iterator[tuple[int, int]]:
    """Frame ranges [k0, k1) of about _CHUNK_BYTES float64 each."""
    frames, rows, columns = shape
    step = max(1, _CHUNK_BYTES // (rows * columns * 8))
    for k0 in range(0, frames, step):
        yield k0, min(k0 + step, frames)


def _is_single_raw(sources: Sequence[DoseSource]) -> bool:
    """One raw file in Gy (scale 1): its memmap is the dose itself, no summing buffer needed."""
    return len(sources) == 1 and sources[0].is_raw and sources[0].scale == 1.0


def _chunk_gy(sources: Sequence[DoseSource], k0: int, k1: int, work: np.ndarray) -> np.ndarray:
    """Dose in Gy of frames [k0, k1): the memmap itself for one raw file, else summed in `work`."""
    if _is_single_raw(sources):
        return sources[0].frames(k0, k1)
    total, scaled = work[0, : k1 - k0], work[1, : k1 - k0]
    for i, source in enumerate(sources):
        np.multiply(source.frames(k0, k1), source.scale, out=total if i == 0 else scaled)
        if i:
            total += scaled
    return total


def _work_buffer(sources: Sequence[DoseSource]) -> np.ndarray:
    """Two chunk-sized float64 buffers for sums (running total, scaled addend)."""
    _, rows, columns = sources[0].shape
    step = 0 if _is_single_raw(sources) else next(chunks(sources[0].shape))[1]
    return np.empty((2, step, rows, columns))


def _checked_max(source: DoseSource, k0: int, k1: int) -> float:
    """Maximum of raw frames [k0, k1), rejecting negative, NaN and infinite dose.

    One reduction instead of min and max: non-negative finite doubles order
    like their bit patterns read as uint64, and every negative, infinite or NaN
    value has a pattern >= that of +inf. Only a flagged chunk is looked at
    again as floats (-0.0 is harmless; anything else names the file).
    """
    values = source.frames(k0, k1)
    top = values.view(np.uint64).max()
    if top < _INF_BITS:
        return float(top.view(np.float64))
    low, high = float(values.min()), float(values.max())
    if not (low >= 0.0 and math.isfinite(high)):
        raise RtDoseError(
            f"{source.path}: raw dose must be finite and >= 0; frames {k0}-{k1 - 1} "
            f"hold min {low!r}, max {high!r}"
        )
    return high


def peak_dose(sources: Sequence[DoseSource]) -> float:
    """Pass 1: the maximum dose in Gy; raw files are checked on the way."""
    work = _work_buffer(sources)
    peak = 0.0
    for k0, k1 in chunks(sources[0].shape):
        raw_peaks = [_checked_max(source, k0, k1) for source in sources if source.is_raw]
        if _is_single_raw(sources):
            peak = max(peak, raw_peaks[0])
        else:
            peak = max(peak, float(_chunk_gy(sources, k0, k1, work).max()))
    return peak


def quantised(sources: Sequence[DoseSource], scaling: float) -> Iterator[np.ndarray]:
    """Pass 2: rint(dose / scaling) as uint16, chunk by chunk of frames in one reused buffer."""
    work = _work_buffer(sources)
    step = next(chunks(sources[0].shape))[1]
    scratch = np.empty((step, *sources[0].shape[1:]))
    pixels = np.empty(scratch.shape, dtype=np.uint16)
    inverse = 1.0 / scaling
    for k0, k1 in chunks(sources[0].shape):
        scaled, out = scratch[: k1 - k0], pixels[: k1 - k0]
        np.multiply(_chunk_gy(sources, k0, k1, work), inverse, out=scaled)
        np.rint(scaled, out=scaled)
        np.copyto(out, scaled, casting="unsafe")
        yield out


def dicom_source(ds: Dataset, path: Path) -> DoseSource:
    """A memmap source over a checked RTDOSE's uncompressed pixel data."""
    bits = int(ds.BitsAllocated)
    if int(ds.get("PixelRepresentation", 0)) != 0 or bits not in (8, 16, 32):
        raise RtDoseError(f"{path}: only unsigned 8/16/32-bit dose pixels are supported")
    pixel_data = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    return DoseSource(
        path=path,
        offset=pixel_data.value_tell,
        dtype=np.dtype(f"<u{bits // 8}"),
        shape=(int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns)),
        scale=float(ds.DoseGridScaling),
        is_raw=False,
    )
