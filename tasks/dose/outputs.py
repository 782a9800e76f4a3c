"""The case's outputs: each beam's engine output as a DICOM RTDOSE, the plan sum, each with provenance.

Raw output is converted (16-bit with DoseGridScaling, in Gy through the calibration,
on the grid the engine scored: its beam-aligned water phantom or the 2 cm plane, in a
frame of reference of that phantom, never the patient's; patient and study from the
plan); an engine that writes DICOM itself has its file validated and collected. The
plan sum is the composite of every field in that one phantom, each entering from the
top, as a field-by-field phantom QA measures it. Every file written is validated, and a
provenance JSON beside it records what produced it, so a physicist can trace any dose
back to the engine run and its inputs.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from pydantic import BaseModel
from pydicom.uid import generate_uid

from config.settings import Settings
from tasks.casefolder import Case
from tasks.common.errors import PermanentError
from tasks.dose.calibration import dose_scale
from tasks.dose.model import DoseFrame, RtDoseInfo
from tasks.dose.plansum import sum_rtdose
from tasks.dose.read import collect_engine_rtdose
from tasks.dose.validate import validate_rtdose
from tasks.dose.write import raw_to_rtdose
from tasks.moqui.beam import BeamResult
from tasks.moqui.inputs import phantom_grid


class DoseOutput(BaseModel):
    """One RTDOSE written for the case (small: passed between tasks)."""

    summation: str  # BEAM or PLAN
    beam_number: int | None
    path: str
    sha256: str
    max_dose_gy: float
    provenance: str


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def beam_file_stem(beam_number: int) -> str:
    return f"RTDOSE_beam{beam_number:02d}"


def _provenance(result: BeamResult) -> dict[str, object]:
    return {
        "beam_number": result.beam.beam_number,
        "beam_name": result.beam.beam_name,
        "engine_command": result.engine_command,
        "input_hash": result.beam.input_hash,
        "host": result.host,
        "gpu": result.gpu,
        "attempts": result.attempts,
        "started": _iso(result.started),
        "ended": _iso(result.ended),
        "engine_log": result.engine_log,
        "engine_output": result.dose_file,
        "engine_histories": result.histories,
        "engine_beamlets": result.beamlets,
        "staged_records": result.beam.records,
        "backend": result.backend,
        "job_dir": result.job_dir,
    }


def water_surface_mm(settings: Settings) -> float:
    """z (mm, phantom frame) of the water surface the beam enters: depth = surface - z."""
    if settings.tps.two_centimeter_mode:
        return settings.engine_profile.two_centimeter_plane.surface_mm
    phantom = phantom_grid(settings)
    return phantom.position[2] + phantom.dims[2] * phantom.spacing[2]


def phantom_frame(settings: Settings, case: Case) -> DoseFrame:
    """The frame of the engine's beam-aligned water phantom: one per plan, never the patient's."""
    uid = generate_uid(
        entropy_srcs=[case.plan_sop_instance_uid, "mqi-communicator beam-aligned water phantom"]
    )
    if not settings.tps.two_centimeter_mode:
        surface = water_surface_mm(settings)
        return DoseFrame(
            uid, f"beam-aligned water phantom, beam along -z, surface z={surface:g} mm", "water phantom"
        )
    plane = settings.engine_profile.two_centimeter_plane
    top = plane.position_mm[2] + plane.dims[2] * plane.spacing_mm[2]
    depths = f"{plane.surface_mm - top:g}-{plane.surface_mm - plane.position_mm[2]:g} mm"
    return DoseFrame(uid, f"2 cm plane ({depths} deep) of a beam-aligned water phantom", "2 cm plane")


def _validated(settings: Settings, info: RtDoseInfo) -> None:
    errors = validate_rtdose(Path(info.path), validator=settings.dicom.validator)
    if errors:
        raise PermanentError(f"{info.path} failed DICOM validation:\n  " + "\n  ".join(errors))


def _write_output(
    settings: Settings, case: Case, info: RtDoseInfo, engine_runs: list[BeamResult]
) -> DoseOutput:
    _validated(settings, info)
    path = Path(info.path)
    provenance = path.with_name(path.stem + ".provenance.json")
    record = {
        "orchestrator": "mqi-communicator",
        "version": version("mqi-communicator"),
        "case_id": case.case_id,
        "plan": case.plan_source,
        "summation": info.summation,
        "rtdose": path.name,
        "rtdose_sha256": info.sha256,
        "dose_grid_scaling": info.scaling,
        "max_dose_gy": info.max_dose_gy,
        "engine_profile": settings.engine.profile,
        "particles_per_history": settings.tps.particles_per_history,
        "gy_per_raw_unit": dose_scale(settings),
        "written": datetime.now(UTC).isoformat(),
        "beams": [_provenance(r) for r in engine_runs],
    }
    part = provenance.with_name(provenance.name + ".part")
    part.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    part.replace(provenance)
    return DoseOutput(
        summation=info.summation,
        beam_number=info.beam_number,
        path=str(path),
        sha256=info.sha256,
        max_dose_gy=info.max_dose_gy,
        provenance=str(provenance),
    )


def convert_beam_dose(settings: Settings, case: Case, result: BeamResult) -> DoseOutput:
    out_dir = settings.output_dir(case.case_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    beam = result.beam
    out = out_dir / f"{beam_file_stem(beam.beam_number)}.dcm"
    source = Path(result.dose_file)
    if settings.tps.output_format == "raw":
        info = raw_to_rtdose(
            [source],
            beam.grid,
            Path(case.plan_path),
            out,
            summation="BEAM",
            frame=phantom_frame(settings, case),
            beam_number=beam.beam_number,
            dose_type=settings.dicom.dose_type,
            scale=dose_scale(settings),
        )
    elif settings.tps.output_format == "dcm":
        info = collect_engine_rtdose(source, out)
    else:
        raise PermanentError(
            f"{beam.subject}: cannot convert engine output format "
            f"{settings.tps.output_format!r} to RTDOSE (use raw or dcm)"
        )
    return _write_output(settings, case, info, [result])


def convert_plan_dose(
    settings: Settings, case: Case, results: list[BeamResult], beams: list[DoseOutput]
) -> DoseOutput:
    out = settings.output_dir(case.case_id) / "RTDOSE_plan.dcm"
    if settings.tps.output_format == "raw":
        info = raw_to_rtdose(
            [Path(r.dose_file) for r in results],
            results[0].beam.grid,
            Path(case.plan_path),
            out,
            summation="PLAN",
            frame=phantom_frame(settings, case),
            dose_type=settings.dicom.dose_type,
            scale=dose_scale(settings),
        )
    else:
        info = sum_rtdose([Path(b.path) for b in beams], Path(case.plan_path), out)
    return _write_output(settings, case, info, results)


def copy_engine_log(settings: Settings, case: Case, result: BeamResult) -> None:
    """Keep the engine log with the outputs, where physicists look first."""
    shutil.copy2(
        result.engine_log,
        settings.output_dir(case.case_id) / f"{beam_file_stem(result.beam.beam_number)}.log",
    )
