"""Prefect tasks: patient-specific QA of each converted beam (gamma against its reference), then the
case's QA report, tag and event (tasks/qa)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from config.settings import Settings
from tasks.casefolder import Case
from tasks.common.labels import beam_label
from tasks.dose.outputs import DoseOutput
from tasks.outcome.summary import artifact_key
from tasks.prefect_api.client import api_client
from tasks.qa.check import case_references, check_beam, write_case_report
from tasks.qa.markdown import beam_markdown
from tasks.qa.model import BeamQa, Reference, case_verdict, qa_failed

QA_FAIL_TAG = "qa:fail"


@task(name="qa-references", task_run_name="QA references {case.case_id}")
def find_qa_references(settings: Settings, case: Case) -> dict[int, list[Reference]]:
    """Prefect wrapper: every treatment beam's QA references (TPS RTDOSE, .mcc)."""
    found = case_references(
        settings, Path(case.case_dir), case.plan_sop_instance_uid, {b.number: b.name for b in case.beams}
    )
    logger = get_run_logger()
    for beam in case.beams:
        names = ", ".join(Path(ref.path).name for ref in found[beam.number]) or "none"
        logger.info("%s: QA reference %s", beam_label(beam.number, beam.name), names)
    return found


@task(name="qa", task_run_name="QA beam {output.beam_number}")
def check_qa(settings: Settings, case: Case, output: DoseOutput, references: list[Reference]) -> BeamQa:
    """Prefect wrapper: gamma of one beam's RTDOSE against its reference; its picture as an artifact."""
    beam = next(b for b in case.beams if b.number == output.beam_number)
    label = beam_label(beam.number, beam.name)
    qa = check_beam(
        settings, case, beam.number, beam.name, Path(output.path), Path(output.provenance), references
    )
    get_run_logger().info("%s: QA %s %s", label, qa.shown, qa.criteria or qa.message)
    if qa.picture:
        create_markdown_artifact(
            beam_markdown(f"Case {case.case_id}, {label}", qa, Path(qa.picture).read_bytes()),
            key=f"{artifact_key(case.case_id)}-qa-beam-{beam.number:02d}",
            description=f"case {case.case_id}: {label} QA {qa.shown}",
        )
    return qa


@task(name="qa-report", task_run_name="QA report {case.case_id}")
def qa_report(settings: Settings, case: Case, results: list[BeamQa]) -> str:
    """Prefect wrapper: the case's QA report PNG; a failed QA tags the run `qa:fail` and emits an event."""
    verdict = case_verdict(results)
    names = {b.number: b.name for b in case.beams}
    if any(r.verdict in ("pass", "fail") for r in results):
        labelled = [(beam_label(r.beam_number, names[r.beam_number]), r) for r in results]
        write_case_report(settings, case, labelled)
    if qa_failed(results):
        run_id = flow_run.get_id()
        if run_id:
            with api_client() as client:
                client.update_flow_run(run_id, tags=sorted({*flow_run.get_tags(), QA_FAIL_TAG}))
        emit_event(
            event="mqi.case.qa.failed",
            resource={"prefect.resource.id": f"mqi.case.{case.case_id}", "mqi.case.dir": case.case_dir},
            related=[
                {"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "case-run"}
            ]
            if run_id
            else [],
            payload={"verdict": verdict, "beams": [r.model_dump() for r in results if r.verdict != "pass"]},
        )
        get_run_logger().warning("case %s: %s", case.case_id, verdict)
    return verdict
