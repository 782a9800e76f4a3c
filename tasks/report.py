"""Prefect task: the case's beam table and summary as artifacts of its flow run, and its final message.

The artifacts are the flow run's (its Artifacts tab), not this task run's: the run's page
is where a physicist looks. The message and its wording are tasks/outcome/summary.py's.
"""

from __future__ import annotations

import json

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from tasks.casefolder import Case
from tasks.outcome.summary import BeamRow, artifact_key, final_message, not_run_markdown, summary_markdown


def publish(kind: str, key: str, data: str, description: str) -> str:
    """Create an artifact of the current flow run; return where the UI shows it."""
    with get_client(sync_client=True) as client:
        artifact = client.create_artifact(
            ArtifactCreate(type=kind, key=key, data=data, description=description, flow_run_id=flow_run.id)
        )
    ui = PREFECT_UI_URL.value()
    return f"{ui}/artifacts/artifact/{artifact.id}" if ui else f"artifact {key}"


@task(name="report", task_run_name="report {case.case_id}")
def report(case: Case, rows: list[BeamRow], plan_sum: str | None, qa: str = "") -> str:
    """Prefect wrapper: publish the beam table and summary; return the final message (`qa`: QA verdict)."""
    message = final_message(case.case_id, rows, qa)
    key = artifact_key(case.case_id)
    publish("table", key, json.dumps([row.model_dump() for row in rows]), message)
    summary = publish(
        "markdown",
        f"{key}-summary",
        summary_markdown(case, rows, message, plan_sum, qa),
        f"case {case.case_id} summary",
    )
    get_run_logger().info("%s; summary: %s", message, summary)
    return message


@task(name="report", task_run_name="report {case_id} (not run)")
def report_not_run(case_id: str, case_dir: str, message: str, details: str) -> None:
    """Prefect wrapper: the summary of a case that stopped before any beam ran."""
    summary = publish(
        "markdown",
        f"{artifact_key(case_id)}-summary",
        not_run_markdown(case_id, case_dir, message, details),
        f"case {case_id} summary",
    )
    get_run_logger().info("%s; summary: %s", message, summary)
