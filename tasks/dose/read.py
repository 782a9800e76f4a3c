"""Read RTDOSE files: headers checked against their pixel data, doses in Gy, engine files collected."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.dose.chunks import chunks, dicom_source
from tasks.dose.files import atomic, file_size
from tasks.dose.geometry import values_of
from tasks.dose.model import PIXEL_DATA_TAG, RT_DOSE_SOP_CLASS, RtDoseError, RtDoseInfo

_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_DEFER_BYTES = 1 << 20  # header reads leave pixel data on disk


def collect_engine_rtdose(dcm_path: Path, out_path: Path) -> RtDoseInfo:
    """Check an engine-written RTDOSE (modality, scaling > 0, pixel data length), then copy it."""
    dcm_path, out_path = Path(dcm_path), Path(out_path)
    ds, problems = read_rtdose_header(dcm_path)
    if problems:
        raise RtDoseError("; ".join(problems))
    source = dicom_source(ds, dcm_path)
    peak = max(float(source.frames(k0, k1).max()) for k0, k1 in chunks(source.shape))
    with atomic(out_path) as tmp:
        shutil.copyfile(dcm_path, tmp)
        with tmp.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return RtDoseInfo(
        path=out_path,
        max_dose_gy=peak * source.scale,
        scaling=source.scale,
        summation=str(ds.get("DoseSummationType", "")),
        beam_number=referenced_beam_number(ds),
        sha256=sha256,
    )


def read_dose_gy(path: Path) -> np.ndarray:
    """Dose in Gy, shape (frames, rows, columns), decoded by pydicom (independent of our reader)."""
    ds = pydicom.dcmread(path)
    scaling = float(ds.DoseGridScaling)
    frames = int(ds.get("NumberOfFrames") or 1)
    return ds.pixel_array.reshape(frames, int(ds.Rows), int(ds.Columns)) * scaling


def read_rtdose_header(path: Path) -> tuple[Dataset | None, list[str]]:
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
    pixel_data = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    expected = rows * columns * frames * bits // 8
    if pixel_data is None:
        problems.append(f"{path}: no PixelData")
    elif pixel_data.length not in (expected, expected + expected % 2):
        problems.append(
            f"{path}: PixelData is {pixel_data.length} bytes, expected {expected} "
            f"(Rows {rows} x Columns {columns} x Frames {frames} x {bits} bits)"
        )
    elif pixel_data.value_tell + pixel_data.length > file_size(path):
        problems.append(f"{path}: file is truncated inside PixelData")
    offsets = values_of(ds.get("GridFrameOffsetVector"))
    if frames > 1 and len(offsets) != frames:
        problems.append(f"{path}: GridFrameOffsetVector has {len(offsets)} values for {frames} frames")
    return ds, problems


def plan_references(ds: Dataset) -> list[Dataset]:
    return list(ds.get("ReferencedRTPlanSequence") or [])


def referenced_beam_number(ds: Dataset) -> int | None:
    for plan in plan_references(ds):
        for group in plan.get("ReferencedFractionGroupSequence") or []:
            for beam in group.get("ReferencedBeamSequence") or []:
                if "ReferencedBeamNumber" in beam:
                    return int(beam.ReferencedBeamNumber)
    return None
