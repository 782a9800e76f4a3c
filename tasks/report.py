"""Prefect task: the case's beam table and summary as artifacts, and its final message (tasks/outcome)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.casefolder import Case
from tasks.outcome.summary import BeamRow, artifact_key, final_message, summary_markdown


@task(name="report", task_run_name="report {case.case_id}")
def report(case: Case, rows: list[BeamRow], plan_sum: str | None) -> str:
    """Prefect wrapper: publish the beam table and summary; return the final message."""
    message = final_message(case, rows)
    key = artifact_key(case.case_id)
    create_table_artifact([row.model_dump() for row in rows], key=key, description=message)
    create_markdown_artifact(
        summary_markdown(case, rows, message, plan_sum),
        key=f"{key}-summary",
        description=f"case {case.case_id} summary",
    )
    return message
