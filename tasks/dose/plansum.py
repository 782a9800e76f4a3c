"""The plan sum: per-beam RTDOSE files on one grid added into one PLAN RTDOSE."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tasks.dose.chunks import DoseSource, dicom_source
from tasks.dose.geometry import DoseGeometry
from tasks.dose.model import DOSE_TYPES, DoseFrame, RtDoseError, RtDoseInfo
from tasks.dose.read import plan_references, read_rtdose_header
from tasks.dose.write import read_plan, write_rtdose


def sum_rtdose(beam_dcms: Sequence[Path], plan_path: Path, out_path: Path) -> RtDoseInfo:
    """Sum per-beam RTDOSE files on one grid into a PLAN RTDOSE for the plan at `plan_path`."""
    if not beam_dcms:
        raise RtDoseError("a plan sum needs at least one beam RTDOSE")
    plan = read_plan(plan_path)
    sources: list[DoseSource] = []
    geometry: DoseGeometry | None = None
    dose_type = None
    frame: DoseFrame | None = None
    for path in map(Path, beam_dcms):
        ds, problems = read_rtdose_header(path)
        if problems:
            raise RtDoseError("; ".join(problems))
        this = DoseGeometry.from_dataset(ds, path)
        if ds.get("DoseType") not in DOSE_TYPES:
            raise RtDoseError(f"{path}: DoseType {ds.get('DoseType')!r} is not one of {DOSE_TYPES}")
        here = DoseFrame(
            uid=str(ds.get("FrameOfReferenceUID", "")),
            comment=str(ds.get("DoseComment", "")),
            label=str(ds.get("SeriesDescription", "")).rpartition(", ")[2],
        )
        if geometry is None:
            geometry, dose_type, frame = this, str(ds.DoseType), here
        elif here.uid != frame.uid:  # type: ignore[union-attr]
            raise RtDoseError(
                f"{path}: frame of reference {here.uid} differs from {beam_dcms[0]}'s: doses in different "
                "frames cannot be summed"
            )
        elif (differs := geometry.mismatch(this)) is not None:
            raise RtDoseError(f"{path}: dose grid differs from {beam_dcms[0]}: {differs}")
        elif ds.DoseType != dose_type:
            raise RtDoseError(f"{path}: DoseType {ds.DoseType} differs from {dose_type}")
        if str(ds.get("DoseUnits", "")).upper() != "GY":
            raise RtDoseError(f"{path}: DoseUnits {ds.get('DoseUnits')!r} is not GY")
        referenced = {str(item.ReferencedSOPInstanceUID) for item in plan_references(ds)}
        if referenced and plan.SOPInstanceUID not in referenced:
            raise RtDoseError(f"{path}: references another plan than {plan_path}")
        sources.append(dicom_source(ds, path))
    assert geometry is not None and dose_type is not None and frame is not None
    return write_rtdose(
        sources,
        geometry,
        plan,
        Path(out_path),
        summation="PLAN",
        frame=frame,
        beam_number=None,
        dose_type=dose_type,
        fraction_group=1,
    )
