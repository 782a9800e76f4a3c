"""Dose files: MOQUI raw dose -> DICOM RTDOSE, engine-written RTDOSE checks, plan sums.

Why it looks like this:
- Doses are stored as 16-bit unsigned pixels with DoseGridScaling (Gy per pixel
  value), as the clinic's engine does: Debian's dciodvfy aborts on 32-bit
  RTDOSE, and 16 bits keep the dose within scaling/2 of the float value.
- DoseGridScaling is never 0 (a past writer produced 0, which makes every dose
  zero): an all-zero dose gets scaling 1.
- Grids can be 400^3 and more, so inputs are read through np.memmap one chunk
  of frames at a time in two passes: the maximum (which fixes the scaling),
  then quantisation into a reused uint16 chunk that is written and hashed at
  once. Neither a full float64 copy nor a full pixel buffer is ever held.
- Files appear atomically: written to `<name>.part` (sha256 taken while
  writing), then renamed.

Plain code, no Prefect: the convert task wraps these functions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from itertools import chain
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from tasks.moqui_input import PhantomGrid

RT_DOSE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"
RT_PLAN_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.8")
DOSE_TYPES = ("PHYSICAL", "EFFECTIVE", "ERROR")
MAX_PIXEL = 65535  # 16-bit unsigned
MANUFACTURER = "MQI Communicator"

# Patient, General Study and Frame of Reference attributes the dose copies from its plan
# (Type 2 ones are written empty when the plan lacks them), and what the plan must have.
_FROM_PLAN = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)
_PLAN_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_PIXEL_DATA = 0x7FE00010
_GRID_FRAME_OFFSET_VECTOR = 0x3004000C
_CHUNK_BYTES = 2 << 20  # float64 bytes per chunk of frames: cache-sized, few memmap calls
_INF_BITS = np.float64(np.inf).view(np.uint64)
_DEFER_BYTES = 1 << 20  # header reads leave pixel data on disk
_GEOMETRY_TOL_MM = 1e-3
_DCIODVFY_TIMEOUT_S = 600


class RtDoseError(ValueError):
    """A dose file that cannot be written, read or trusted; the message names the file."""


@dataclass(frozen=True)
class RtDoseInfo:
    """What a written or collected RTDOSE holds; small enough to pass between tasks."""

    path: Path
    max_dose_gy: float
    scaling: float
    summation: str
    beam_number: int | None
    sha256: str


@dataclass(frozen=True)
class _Geometry:
    """The RTDOSE grid: frames x rows x columns, positioned at the first voxel centre."""

    rows: int
    columns: int
    frames: int
    position: tuple[float, ...]  # mm, centre of the first voxel
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]  # mm: (between rows = dy, between columns = dx)
    frame_offsets: tuple[float, ...]  # mm, relative to position
    slice_thickness: float | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.rows, self.columns)

    @classmethod
    def from_grid(cls, grid: PhantomGrid) -> _Geometry:
        nx, ny, nz = grid.dims
        dx, dy, dz = grid.spacing
        return cls(
            rows=ny,
            columns=nx,
            frames=nz,
            position=grid.first_voxel_centre,
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            pixel_spacing=(dy, dx),
            frame_offsets=tuple(k * dz for k in range(nz)),
            slice_thickness=dz,
        )

    @classmethod
    def from_dataset(cls, ds: Dataset, path: Path) -> _Geometry:
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
            offsets = _values(ds.get("GridFrameOffsetVector")) or [0.0]
            thickness = ds.get("SliceThickness")
            return cls(
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                frames=frames,
                position=tuple(float(v) for v in ds.ImagePositionPatient),
                orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
                pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                frame_offsets=tuple(float(v) for v in offsets),
                slice_thickness=None if thickness in (None, "") else float(thickness),
            )
        except (AttributeError, IndexError, TypeError, ValueError) as bad:
            raise RtDoseError(f"{path}: RTDOSE geometry is incomplete or invalid: {bad}") from None

    def mismatch(self, other: _Geometry) -> str | None:
        """Name the first attribute in which `other` differs from this grid, if any."""
        if self.shape != other.shape:
            return f"frames x rows x columns {other.shape} != {self.shape}"
        for name in ("position", "orientation", "pixel_spacing", "frame_offsets"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if len(mine) != len(theirs) or any(
                abs(a - b) > _GEOMETRY_TOL_MM for a, b in zip(mine, theirs, strict=True)
            ):
                return f"{name} {list(theirs)} != {list(mine)}"
        return None


@dataclass(frozen=True)
class _DoseSource:
    """One input dose file read by frame chunks through np.memmap.

    Raw engine output is float64 Gy (scale 1) and is checked for negative and
    non-finite values; RTDOSE pixel data is unsigned and scaled by its
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


def raw_to_rtdose(
    raw_paths: Sequence[Path],
    grid: PhantomGrid,
    plan_path: Path,
    out_path: Path,
    *,
    summation: Literal["BEAM", "PLAN"],
    beam_number: int | None = None,
    dose_type: str = "PHYSICAL",
    fraction_group: int = 1,
) -> RtDoseInfo:
    """Write MOQUI raw dose (one beam, or the voxel-wise sum of beams) as an RTDOSE."""
    if summation == "BEAM":
        if len(raw_paths) != 1 or beam_number is None:
            raise RtDoseError("a BEAM dose needs exactly one raw file and a beam number")
    elif summation == "PLAN":
        if not raw_paths or beam_number is not None:
            raise RtDoseError("a PLAN dose needs at least one raw file and no beam number")
    else:
        raise RtDoseError(f"summation must be BEAM or PLAN, not {summation!r}")
    geometry = _Geometry.from_grid(grid)
    expected = grid.voxel_count * 8
    sources = []
    for raw in map(Path, raw_paths):
        size = _file_size(raw)
        if size != expected:
            raise RtDoseError(
                f"{raw}: raw dose is {size} bytes, expected {expected} "
                f"(nx*ny*nz*8 for grid {grid.dims} float64)"
            )
        sources.append(_DoseSource(raw, 0, np.dtype(np.float64), grid.shape, 1.0, True))
    return _write_rtdose(
        sources,
        geometry,
        _read_plan(plan_path),
        Path(out_path),
        summation=summation,
        beam_number=beam_number,
        dose_type=dose_type,
        fraction_group=fraction_group,
    )


def collect_engine_rtdose(dcm_path: Path, out_path: Path) -> RtDoseInfo:
    """Check an engine-written RTDOSE (modality, scaling > 0, pixel data length), then copy it."""
    dcm_path, out_path = Path(dcm_path), Path(out_path)
    ds, problems = _read_rtdose_header(dcm_path)
    if problems:
        raise RtDoseError("; ".join(problems))
    source = _dicom_source(ds, dcm_path)
    peak = max(float(source.frames(k0, k1).max()) for k0, k1 in _chunks(source.shape))
    with _atomic(out_path) as tmp:
        shutil.copyfile(dcm_path, tmp)
        with tmp.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return RtDoseInfo(
        path=out_path,
        max_dose_gy=peak * source.scale,
        scaling=source.scale,
        summation=str(ds.get("DoseSummationType", "")),
        beam_number=_referenced_beam_number(ds),
        sha256=sha256,
    )


def sum_rtdose(beam_dcms: Sequence[Path], plan_path: Path, out_path: Path) -> RtDoseInfo:
    """Sum per-beam RTDOSE files on one grid into a PLAN RTDOSE for the plan at `plan_path`."""
    if not beam_dcms:
        raise RtDoseError("a plan sum needs at least one beam RTDOSE")
    plan = _read_plan(plan_path)
    sources: list[_DoseSource] = []
    geometry: _Geometry | None = None
    dose_type = None
    for path in map(Path, beam_dcms):
        ds, problems = _read_rtdose_header(path)
        if problems:
            raise RtDoseError("; ".join(problems))
        this = _Geometry.from_dataset(ds, path)
        if ds.get("DoseType") not in DOSE_TYPES:
            raise RtDoseError(f"{path}: DoseType {ds.get('DoseType')!r} is not one of {DOSE_TYPES}")
        if geometry is None:
            geometry, dose_type = this, str(ds.DoseType)
        elif (differs := geometry.mismatch(this)) is not None:
            raise RtDoseError(f"{path}: dose grid differs from {beam_dcms[0]}: {differs}")
        elif ds.DoseType != dose_type:
            raise RtDoseError(f"{path}: DoseType {ds.DoseType} differs from {dose_type}")
        if str(ds.get("DoseUnits", "")).upper() != "GY":
            raise RtDoseError(f"{path}: DoseUnits {ds.get('DoseUnits')!r} is not GY")
        referenced = {str(item.ReferencedSOPInstanceUID) for item in _plan_references(ds)}
        if referenced and plan.SOPInstanceUID not in referenced:
            raise RtDoseError(f"{path}: references another plan than {plan_path}")
        sources.append(_dicom_source(ds, path))
    assert geometry is not None and dose_type is not None
    return _write_rtdose(
        sources,
        geometry,
        plan,
        Path(out_path),
        summation="PLAN",
        beam_number=None,
        dose_type=dose_type,
        fraction_group=1,
    )


def validate_rtdose(path: Path, validator: str | None = "dciodvfy") -> list[str]:
    """Problems with an RTDOSE file (pydicom read-back, then dciodvfy errors); empty if none.

    `validator` is the dciodvfy command (name or path); None, or a command that
    is not installed, skips it (the caller decides whether to warn).
    """
    path = Path(path)
    _, problems = _read_rtdose_header(path)
    if problems or validator is None or not dciodvfy_available(validator):
        return problems
    return _dciodvfy_errors(validator, path)


def dciodvfy_available(validator: str = "dciodvfy") -> bool:
    """True if dicom3tools' IOD verifier can be run."""
    return shutil.which(validator) is not None


def read_dose_gy(path: Path) -> np.ndarray:
    """Dose in Gy, shape (frames, rows, columns), decoded by pydicom (independent of our reader)."""
    ds = pydicom.dcmread(path)
    scaling = float(ds.DoseGridScaling)
    frames = int(ds.get("NumberOfFrames") or 1)
    return ds.pixel_array.reshape(frames, int(ds.Rows), int(ds.Columns)) * scaling


# --- writing ----------------------------------------------------------------


def _write_rtdose(
    sources: Sequence[_DoseSource],
    geometry: _Geometry,
    plan: Dataset,
    out_path: Path,
    *,
    summation: str,
    beam_number: int | None,
    dose_type: str,
    fraction_group: int,
) -> RtDoseInfo:
    if dose_type not in DOSE_TYPES:
        raise RtDoseError(f"dose type must be one of {', '.join(DOSE_TYPES)}, not {dose_type!r}")
    if fraction_group < 1:
        raise RtDoseError(f"fraction group must be >= 1, not {fraction_group}")
    peak = _peak_dose(sources)
    scaling_ds = _scaling_ds(peak)
    header = io.BytesIO()
    ds = _dataset(plan, geometry, summation, beam_number, dose_type, fraction_group, scaling_ds)
    pydicom.dcmwrite(header, ds, enforce_file_format=True)
    # Pixel Data is the dataset's last element: its Explicit VR Little Endian
    # header goes here and the value is streamed chunk by chunk below, so no
    # full-size pixel buffer or copy of it ever exists.
    header.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 2 * math.prod(geometry.shape)))
    with _atomic(out_path) as tmp:
        sha256 = _write_and_hash(tmp, chain([header.getbuffer()], _quantised(sources, float(scaling_ds))))
    return RtDoseInfo(
        path=out_path,
        max_dose_gy=peak,
        scaling=float(scaling_ds),
        summation=summation,
        beam_number=beam_number,
        sha256=sha256,
    )


def _chunks(shape: tuple[int, int, int]) -> Iterator[tuple[int, int]]:
    """Frame ranges [k0, k1) of about _CHUNK_BYTES float64 each."""
    frames, rows, columns = shape
    step = max(1, _CHUNK_BYTES // (rows * columns * 8))
    for k0 in range(0, frames, step):
        yield k0, min(k0 + step, frames)


def _is_single_raw(sources: Sequence[_DoseSource]) -> bool:
    """One raw file: its memmap is the dose itself, no summing buffer needed."""
    return len(sources) == 1 and sources[0].is_raw


def _chunk_gy(sources: Sequence[_DoseSource], k0: int, k1: int, work: np.ndarray) -> np.ndarray:
    """Dose in Gy of frames [k0, k1): the memmap itself for one raw file, else summed in `work`."""
    if _is_single_raw(sources):
        return sources[0].frames(k0, k1)
    total, scaled = work[0, : k1 - k0], work[1, : k1 - k0]
    for i, source in enumerate(sources):
        np.multiply(source.frames(k0, k1), source.scale, out=total if i == 0 else scaled)
        if i:
            total += scaled
    return total


def _work_buffer(sources: Sequence[_DoseSource]) -> np.ndarray:
    """Two chunk-sized float64 buffers for sums (running total, scaled addend)."""
    _, rows, columns = sources[0].shape
    step = 0 if _is_single_raw(sources) else next(_chunks(sources[0].shape))[1]
    return np.empty((2, step, rows, columns))


def _checked_max(source: _DoseSource, k0: int, k1: int) -> float:
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


def _peak_dose(sources: Sequence[_DoseSource]) -> float:
    """Pass 1: the maximum dose in Gy; raw files are checked on the way."""
    work = _work_buffer(sources)
    peak = 0.0
    for k0, k1 in _chunks(sources[0].shape):
        raw_peaks = [_checked_max(source, k0, k1) for source in sources if source.is_raw]
        if _is_single_raw(sources):
            peak = max(peak, raw_peaks[0])
        else:
            peak = max(peak, float(_chunk_gy(sources, k0, k1, work).max()))
    return peak


def _scaling_ds(peak: float) -> str:
    """DoseGridScaling as the DS string that is written; quantisation uses exactly this value.

    The DS keeps about 10 significant digits, so the peak maps to 65535 within
    1e-9 and rounding never exceeds 65535. An all-zero dose (or a denormal one,
    whose scaling would underflow) gets 1: any positive scaling decodes to
    zeros, and 0 would be invalid.
    """
    text = format_number_as_ds(peak / MAX_PIXEL)
    scaling = float(text)
    return text if scaling > 0 and peak / scaling < MAX_PIXEL + 0.5 else "1"


def _quantised(sources: Sequence[_DoseSource], scaling: float) -> Iterator[np.ndarray]:
    """Pass 2: rint(dose / scaling) as uint16, chunk by chunk of frames in one reused buffer."""
    work = _work_buffer(sources)
    step = next(_chunks(sources[0].shape))[1]
    scratch = np.empty((step, *sources[0].shape[1:]))
    pixels = np.empty(scratch.shape, dtype=np.uint16)
    inverse = 1.0 / scaling
    for k0, k1 in _chunks(sources[0].shape):
        scaled, out = scratch[: k1 - k0], pixels[: k1 - k0]
        np.multiply(_chunk_gy(sources, k0, k1, work), inverse, out=scaled)
        np.rint(scaled, out=scaled)
        np.copyto(out, scaled, casting="unsafe")
        yield out


def _write_and_hash(path: Path, blocks: Iterable[memoryview | np.ndarray]) -> str:
    """Write `blocks` to `path` and return their sha256, computed on the way (no re-read)."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for block in blocks:
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def _ds_mm(value: float) -> str:
    """A coordinate as DS, rounded to 1e-6 mm so k*dz prints as 7.5, not 7.500000000000001."""
    return format_number_as_ds(round(value, 6) + 0.0)


def _dataset(
    plan: Dataset,
    geometry: _Geometry,
    summation: str,
    beam_number: int | None,
    dose_type: str,
    fraction_group: int,
    scaling_ds: str,
) -> Dataset:
    """Every Type 1 and 2 attribute of the RT Dose IOD's modules, pixel data excepted."""
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    sop_instance_uid = generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_DOSE_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta

    # SOP Common
    if "SpecificCharacterSet" in plan:
        ds.SpecificCharacterSet = plan.SpecificCharacterSet
    ds.SOPClassUID = RT_DOSE_SOP_CLASS
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient, General Study, Frame of Reference: from the plan
    for keyword in _FROM_PLAN:
        setattr(ds, keyword, plan.get(keyword, ""))
    # RT Series
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.OperatorsName = ""
    ds.SeriesDescription = f"MOQUI {summation} dose" + (
        f" beam {beam_number}" if beam_number is not None else ""
    )
    ds.SeriesDate, ds.SeriesTime = date, time
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.SoftwareVersions = _software_version()
    # General Image
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    # Image Plane
    ds.ImagePositionPatient = [_ds_mm(v) for v in geometry.position]
    ds.ImageOrientationPatient = [format_number_as_ds(v + 0.0) for v in geometry.orientation]
    ds.PixelSpacing = [_ds_mm(v) for v in geometry.pixel_spacing]
    ds.SliceThickness = "" if geometry.slice_thickness is None else _ds_mm(geometry.slice_thickness)
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geometry.rows, geometry.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    # Multi-frame, only for several frames: GridFrameOffsetVector has VM 2-n,
    # so a single-frame dose is a plain image placed by ImagePositionPatient.
    if geometry.frames > 1:
        ds.NumberOfFrames = geometry.frames
        ds.FrameIncrementPointer = _GRID_FRAME_OFFSET_VECTOR
        ds.GridFrameOffsetVector = [_ds_mm(v) for v in geometry.frame_offsets]
    # RT Dose
    ds.DoseUnits = "GY"
    ds.DoseType = dose_type
    ds.DoseSummationType = summation
    ds.DoseGridScaling = scaling_ds
    reference = Dataset()
    reference.ReferencedSOPClassUID = plan.SOPClassUID
    reference.ReferencedSOPInstanceUID = plan.SOPInstanceUID
    if beam_number is not None:
        beam = Dataset()
        beam.ReferencedBeamNumber = beam_number
        group = Dataset()
        group.ReferencedFractionGroupNumber = fraction_group
        group.ReferencedBeamSequence = [beam]
        reference.ReferencedFractionGroupSequence = [group]
    ds.ReferencedRTPlanSequence = [reference]
    return ds


def _software_version() -> str:
    try:
        return f"mqi-communicator {metadata.version('mqi-communicator')}"
    except metadata.PackageNotFoundError:
        return "mqi-communicator"


# --- reading ----------------------------------------------------------------


def _read_plan(plan_path: Path) -> Dataset:
    """The RT (Ion) Plan whose patient, study and frame of reference the dose inherits."""
    plan_path = Path(plan_path)
    try:
        plan = pydicom.dcmread(plan_path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as bad:
        raise RtDoseError(f"{plan_path}: cannot read the RT plan: {bad}") from None
    if plan.get("Modality") != "RTPLAN" or plan.get("SOPClassUID") not in RT_PLAN_SOP_CLASSES:
        raise RtDoseError(
            f"{plan_path}: not an RT (Ion) Plan (Modality {plan.get('Modality')!r}, "
            f"SOP class {plan.get('SOPClassUID')!r})"
        )
    missing = [keyword for keyword in _PLAN_REQUIRED if not plan.get(keyword)]
    if missing:
        raise RtDoseError(f"{plan_path}: the plan has no {', '.join(missing)}")
    return plan


def _read_rtdose_header(path: Path) -> tuple[Dataset | None, list[str]]:
    """Header of an RTDOSE (pixel data left on disk) and what is wrong with it."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except (OSError, InvalidDicomError) as bad:
        return None, [f"{path}: cannot read as DICOM: {bad}"]
    problems = []
    if ds.get("SOPClassUID") != RT_DOSE_SOP_CLASS or ds.get("Modality") != "RTDOSE":
        problems.append(
            f"{path}: not an RTDOSE (Modality {ds.get('Modality')!r}, SOP class {ds.get('SOPClassUID')!r})"
        )
    try:
        scaling = float(ds.DoseGridScaling)
    except (AttributeError, TypeError, ValueError):
        scaling = math.nan
    if not (math.isfinite(scaling) and scaling > 0):
        problems.append(f"{path}: DoseGridScaling must be > 0, found {ds.get('DoseGridScaling')!r}")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in _UNCOMPRESSED_LE:
        problems.append(f"{path}: transfer syntax {syntax} is not uncompressed little endian")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames, bits = int(ds.get("NumberOfFrames") or 1), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        problems.append(f"{path}: Rows, Columns or BitsAllocated missing or invalid")
        return ds, problems
    pixel_data = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    expected = rows * columns * frames * bits // 8
    if pixel_data is None:
        problems.append(f"{path}: no PixelData")
    elif pixel_data.length not in (expected, expected + expected % 2):
        problems.append(
            f"{path}: PixelData is {pixel_data.length} bytes, expected {expected} "
            f"(Rows {rows} x Columns {columns} x Frames {frames} x {bits} bits)"
        )
    elif pixel_data.value_tell + pixel_data.length > _file_size(path):
        problems.append(f"{path}: file is truncated inside PixelData")
    offsets = _values(ds.get("GridFrameOffsetVector"))
    if frames > 1 and len(offsets) != frames:
        problems.append(f"{path}: GridFrameOffsetVector has {len(offsets)} values for {frames} frames")
    return ds, problems


def _values(value: object) -> list:
    """A DICOM value as a list: pydicom gives a bare value for VM 1 and None when empty."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list) else [value]


def _dicom_source(ds: Dataset, path: Path) -> _DoseSource:
    """A memmap source over a checked RTDOSE's uncompressed pixel data."""
    bits = int(ds.BitsAllocated)
    if int(ds.get("PixelRepresentation", 0)) != 0 or bits not in (8, 16, 32):
        raise RtDoseError(f"{path}: only unsigned 8/16/32-bit dose pixels are supported")
    pixel_data = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    return _DoseSource(
        path=path,
        offset=pixel_data.value_tell,
        dtype=np.dtype(f"<u{bits // 8}"),
        shape=(int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns)),
        scale=float(ds.DoseGridScaling),
        is_raw=False,
    )


def _plan_references(ds: Dataset) -> list[Dataset]:
    return list(ds.get("ReferencedRTPlanSequence") or [])


def _referenced_beam_number(ds: Dataset) -> int | None:
    for plan in _plan_references(ds):
        for group in plan.get("ReferencedFractionGroupSequence") or []:
            for beam in group.get("ReferencedBeamSequence") or []:
                if "ReferencedBeamNumber" in beam:
                    return int(beam.ReferencedBeamNumber)
    return None


def _dciodvfy_errors(validator: str, path: Path) -> list[str]:
    """dciodvfy's `Error` lines for `path`; an abort (it asserts on 32-bit RTDOSE) is an error."""
    try:
        result = subprocess.run(
            [validator, str(path)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_DCIODVFY_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return [f"{path}: dciodvfy did not finish within {_DCIODVFY_TIMEOUT_S} s"]
    lines = (result.stdout + result.stderr).splitlines()
    errors = [f"{path}: {line.strip()}" for line in lines if line.startswith("Error")]
    if result.returncode < 0 or (result.returncode and not errors):
        tail = " | ".join(line.strip() for line in lines[-3:])
        errors.append(f"{path}: dciodvfy failed (exit code {result.returncode}): {tail}")
    return errors


# --- files ------------------------------------------------------------------


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as bad:
        raise RtDoseError(f"{path}: cannot read: {bad.strerror}") from None


@contextmanager
def _atomic(out_path: Path) -> Iterator[Path]:
    """A `<name>.part` path to write; it becomes `out_path` only if the block succeeds."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        yield tmp
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
