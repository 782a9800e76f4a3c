"""One beam's QA, from its RTDOSE and references to a verdict, a picture and a provenance entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from config.settings import Settings
from tasks.casefolder import Case
from tasks.common.labels import beam_label, beam_subject
from tasks.dose.outputs import water_surface_mm
from tasks.qa.gamma import Criteria, figures, gamma_map
from tasks.qa.grids import DoseGrid, aligned, evaluated_grid, read_mcc, read_rtdose_grid
from tasks.qa.model import BeamQa, QaInputError, Reference
from tasks.qa.pictures import beam_picture, case_report
from tasks.qa.references import find_references

REPORT_NAME = "QA_report.png"


def criteria_of(settings: Settings) -> Criteria:
    qa = settings.qa
    local = qa.normalisation == "local"
    return Criteria(qa.dose_percent, qa.distance_mm, qa.low_dose_cutoff_percent, local, qa.search_steps)


def case_references(
    settings: Settings, case_dir: Path, plan_uid: str, beams: dict[int, str]
) -> dict[int, list[Reference]]:
    """Every treatment beam's references (number -> list), in the case folder and the reference folder."""
    folders = [case_dir]
    extra = settings.qa_reference_dir(case_dir.name)
    if extra is not None:
        folders.append(extra)
    return find_references(folders, plan_uid, beams)


def _reference_grid(settings: Settings, case: Case, reference: Reference) -> DoseGrid:
    if reference.kind == "measurement (.mcc)":
        return read_mcc(reference.path, water_surface_mm(settings) - settings.qa.measurement_depth_mm)
    return read_rtdose_grid(
        reference.path, rbe=settings.qa.rbe, patient_frame_uid=case.frame_of_reference_uid
    )


def _record(provenance: Path, qa: BeamQa) -> None:
    """Add the verdict to the beam's provenance JSON (atomically, as it was written)."""
    record = json.loads(provenance.read_text(encoding="utf-8"))
    record["qa"] = qa.model_dump()
    part = provenance.with_name(provenance.name + ".part")
    part.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    part.replace(provenance)


def check_beam(
    settings: Settings,
    case: Case,
    beam_number: int,
    beam_name: str,
    rtdose: Path,
    provenance: Path,
    references: list[Reference],
) -> BeamQa:
    """Gamma of the beam's RTDOSE against its one reference; QaInputError (naming both files) if unusable."""
    subject = beam_subject(case.case_id, beam_number, beam_name)
    if not settings.qa.enabled:
        qa = BeamQa(beam_number=beam_number, verdict="off", message="QA disabled (qa.enabled: false)")
    elif not references:
        qa = BeamQa(beam_number=beam_number, verdict="no reference", message="no reference found")
    elif len(references) > 1:
        names = ", ".join(ref.path for ref in references)
        raise QaInputError(f"{subject}: {len(references)} QA references, expected one: {names}")
    else:
        qa = _compare(settings, case, subject, beam_number, beam_name, rtdose, references[0])
    _record(provenance, qa)
    return qa


def _compare(
    settings: Settings, case: Case, subject: str, number: int, name: str, rtdose: Path, reference: Reference
) -> BeamQa:
    criteria = criteria_of(settings)
    try:
        ref = _reference_grid(settings, case, reference)
        evaluated = evaluated_grid(str(rtdose))
        comparison = aligned(ref, evaluated, criteria.cutoff_gy(float(np.nanmax(ref.dose))))
        gamma = gamma_map(comparison, criteria)
        found = figures(gamma)
        if found.points == 0:
            raise QaInputError("no reference point above the cutoff lies inside the recalculated grid")
    except QaInputError as error:
        raise QaInputError(f"{subject}: QA of {rtdose} against {reference.path}: {error}") from None
    level = settings.qa.action_level_percent
    qa = BeamQa(
        beam_number=number,
        verdict="pass" if found.pass_rate >= level else "fail",
        reference=reference.path,
        kind=reference.kind,
        criteria=criteria.describe(comparison.dimensions),
        pass_rate=round(found.pass_rate, 2),
        mean_gamma=round(found.mean, 3),
        max_gamma=round(found.max, 3),
        points=found.points,
        action_level=level,
    )
    picture = rtdose.with_name(f"{rtdose.stem}_qa.png")
    title = f"case {case.case_id}, {beam_label(number, name)}"
    beam_picture(picture, title, comparison, gamma, qa, water_surface_mm(settings))
    return qa.model_copy(update={"picture": str(picture)})


def write_case_report(settings: Settings, case: Case, results: list[tuple[str, BeamQa]]) -> Path:
    """The case's QA report (PNG) in its output folder."""
    path = settings.output_dir(case.case_id) / REPORT_NAME
    return case_report(path, f"case {case.case_id}: patient-specific QA", results)
