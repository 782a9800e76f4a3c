"""Write MOQUI raw dose (one beam, or the voxel-wise sum of beams) as a DICOM RTDOSE.

Doses are stored as 16-bit unsigned pixels with DoseGridScaling (Gy per pixel value), as
the clinic's engine does: Debian's dciodvfy aborts on 32-bit RTDOSE, and 16 bits keep the
dose within scaling/2 of the float value. DoseGridScaling is never 0 (a past writer
produced 0, which makes every dose zero): an all-zero dose gets scaling 1. Every Type 1
and 2 attribute of the RT Dose IOD is written; patient, study and frame of reference come
from the plan. Files appear atomically (written to `<name>.part`, hashed on the way).
"""

from __future__ import annotations

import datetime as dt
import io
import math
import struct
from collections.abc import Sequence
from importlib import metadata
from itertools import chain
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from tasks.dose.chunks import DoseSource, peak_dose, quantised
from tasks.dose.files import atomic, file_size, write_and_hash
from tasks.dose.geometry import DoseGeometry
from tasks.dose.model import (
    DOSE_TYPES,
    RT_DOSE_SOP_CLASS,
    RT_PLAN_SOP_CLASSES,
    DoseFrame,
    RtDoseError,
    RtDoseInfo,
)
from tasks.moqui.grid import PhantomGrid

MAX_PIXEL = 65535  # 16-bit unsigned

MANUFACTURER = "MQI Communicator"


# Patient and General Study attributes the dose copies from its plan
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
)

_PLAN_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
_GRID_FRAME_OFFSET_VECTOR = 0x3004000C


def raw_to_rtdose(
    raw_paths: Sequence[Path],
    grid: PhantomGrid,
    plan_path: Path,
    out_path: Path,
    *,
    summation: Literal["BEAM", "PLAN"],
    frame: DoseFrame,
    beam_number: int | None = None,
    dose_type: str = "PHYSICAL",
    fraction_group: int = 1,
    scale: float = 1.0,
) -> RtDoseInfo:
    """Write MOQUI raw dose (one beam, or the voxel-wise sum of beams) as an RTDOSE.

    `scale` is the Gy per raw unit (the calibration); `frame` the grid's frame of reference.
    """
    if summation == "BEAM":
        if len(raw_paths) != 1 or beam_number is None:
            raise RtDoseError("a BEAM dose needs exactly one raw file and a beam number")
    elif summation == "PLAN":
        if not raw_paths or beam_number is not None:
            raise RtDoseError("a PLAN dose needs at least one raw file and no beam number")
    else:
        raise RtDoseError(f"summation must be BEAM or PLAN, not {summation!r}")
    geometry = DoseGeometry.from_grid(grid)
    expected = grid.voxel_count * 8
    sources = []
    for raw in map(Path, raw_paths):
        size = file_size(raw)
        if size != expected:
            raise RtDoseError(
                f"{raw}: raw dose is {size} bytes, expected {expected} "
                f"(nx*ny*nz*8 for grid {grid.dims} float64)"
            )
        sources.append(DoseSource(raw, 0, np.dtype(np.float64), grid.shape, scale, True))
    return write_rtdose(
        sources,
        geometry,
        read_plan(plan_path),
        Path(out_path),
        summation=summation,
        frame=frame,
        beam_number=beam_number,
        dose_type=dose_type,
        fraction_group=fraction_group,
    )


def write_rtdose(
    sources: Sequence[DoseSource],
    geometry: DoseGeometry,
    plan: Dataset,
    out_path: Path,
    *,
    summation: str,
    frame: DoseFrame,
    beam_number: int | None,
    dose_type: str,
    fraction_group: int,
) -> RtDoseInfo:
    if dose_type not in DOSE_TYPES:
        raise RtDoseError(f"dose type must be one of {', '.join(DOSE_TYPES)}, not {dose_type!r}")
    if fraction_group < 1:
        raise RtDoseError(f"fraction group must be >= 1, not {fraction_group}")
    peak = peak_dose(sources)
    scaling_ds = _scaling_ds(peak)
    header = io.BytesIO()
    ds = _dataset(plan, geometry, summation, frame, beam_number, dose_type, fraction_group, scaling_ds)
    pydicom.dcmwrite(header, ds, enforce_file_format=True)
    # Pixel Data is the dataset's last element: its Explicit VR Little Endian
    # header goes here and the value is streamed chunk by chunk below, so no
    # full-size pixel buffer or copy of it ever exists.
    header.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 2 * math.prod(geometry.shape)))
    with atomic(out_path) as tmp:
        sha256 = write_and_hash(tmp, chain([header.getbuffer()], quantised(sources, float(scaling_ds))))
    return RtDoseInfo(
        path=out_path,
        max_dose_gy=peak,
        scaling=float(scaling_ds),
        summation=summation,
        beam_number=beam_number,
        sha256=sha256,
    )


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


def _ds_mm(value: float) -> str:
    """A coordinate as DS, rounded to 1e-6 mm so k*dz prints as 7.5, not 7.500000000000001."""
    return format_number_as_ds(round(value, 6) + 0.0)


def _dataset(
    plan: Dataset,
    geometry: DoseGeometry,
    summation: str,
    frame: DoseFrame,
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
    # Patient and General Study from the plan; the Frame of Reference is the dose grid's own
    for keyword in _FROM_PLAN:
        setattr(ds, keyword, plan.get(keyword, ""))
    ds.FrameOfReferenceUID = frame.uid
    ds.PositionReferenceIndicator = ""
    # RT Series
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.OperatorsName = ""
    ds.SeriesDescription = (
        f"MOQUI {summation} dose"
        + (f" beam {beam_number}" if beam_number is not None else "")
        + f", {frame.label}"
    )[:64]
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
    if frame.comment:
        ds.DoseComment = frame.comment[:64]
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


def read_plan(plan_path: Path) -> Dataset:
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
