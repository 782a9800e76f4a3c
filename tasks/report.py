"""Report a case: a table artifact (one row per beam), a markdown summary, a final message.

The physicist's first question is "which beam, on which GPU, how many tries,
where is the dose?"; the table answers it in the Prefect UI, and the final
state message ("3/3 beams done" or which beam failed and why) answers it in
the run list.
"""

from __future__ import annotations

import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from tasks.casefolder import Case


class BeamRow(BaseModel):
    beam: int
    name: str
    state: str
    gpu: int | None = None
    attempts: int | None = None
    duration_s: float | None = None
    output: str = ""
    message: str = ""


def artifact_key(case_id: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", case_id.lower()).strip("-")
    return f"case-{slug or 'unnamed'}"[:100]


def final_message(case: Case, rows: list[BeamRow]) -> str:
    done = sum(row.state == "Completed" for row in rows)
    message = f"{done}/{len(rows)} beams done"
    failed = [row for row in rows if row.state != "Completed"]
    if failed:
        reasons = "; ".join(f"beam {r.beam} ({r.name}) failed: {r.message.splitlines()[0]}" for r in failed)
        message += f", {reasons}"
    return f"case {case.case_id}: {message}"


def summary_markdown(case: Case, rows: list[BeamRow], message: str, plan_sum: str | None) -> str:
    lines = [
        f"# Case {case.case_id}",
        "",
        f"**{message}**",
        "",
        f"Plan `{case.plan_label}` for patient `{case.patient_id}`, machine {case.machine}.",
        "",
        "| beam | name | state | GPU | attempts | duration (s) | output |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        duration = f"{r.duration_s:.1f}" if r.duration_s is not None else ""
        lines.append(
            f"| {r.beam} | {r.name} | {r.state} | {'' if r.gpu is None else r.gpu} | "
            f"{r.attempts or ''} | {duration} | {r.output} |"
        )
    for ex in case.excluded:
        lines.append(f"\nBeam {ex.number} ({ex.name}) not simulated: {ex.reason}")
    failed = [r for r in rows if r.state != "Completed"]
    for r in failed:
        lines += ["", f"## Beam {r.beam} ({r.name}) failed", "", "```", r.message, "```"]
    lines += ["", f"Plan sum: {plan_sum}" if plan_sum else "No plan sum (not every beam finished)."]
    return "\n".join(lines) + "\n"


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
