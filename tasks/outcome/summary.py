"""How a case ended: one row per beam, a markdown summary and the final message.

The physicist's first question is "which beam, on which GPU, how many tries,
where is the dose?"; the table answers it in the Prefect UI, and the final
state message ("3/3 beams done" or which beam failed and why) answers it in
the run list.
"""

from __future__ import annotations

import re

from pydantic import BaseModel

from tasks.casefolder import Case
from tasks.common.labels import beam_label, beam_title


class BeamRow(BaseModel):
    """One beam in the case's table: how it ended, and why when it failed."""

    beam: int
    name: str
    state: str
    gpu: int | None = None
    attempts: int | None = None
    duration_s: float | None = None
    output: str = ""
    cause: str = ""  # one line: what the final message says of a failed beam
    message: str = ""  # the whole error: what the summary shows of a failed beam

    @property
    def label(self) -> str:
        return beam_label(self.beam, self.name)


def artifact_key(case_id: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", case_id.lower()).strip("-")
    return f"case-{slug or 'unnamed'}"[:100]


def final_message(case: Case, rows: list[BeamRow]) -> str:
    """`case X: 2/3 beams done, beam 3 (2G090:TX) failed: engine crashed (SIGSEGV, exit 139)`."""
    done = sum(row.state == "Completed" for row in rows)
    message = f"{done}/{len(rows)} beams done"
    failed = [row for row in rows if row.state != "Completed"]
    if failed:
        message += ", " + "; ".join(f"{row.label} failed: {row.cause}" for row in failed)
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
        lines.append(f"\n{beam_title(ex.number, ex.name)} not simulated: {ex.reason}")
    failed = [r for r in rows if r.state != "Completed"]
    for r in failed:
        lines += ["", f"## {beam_title(r.beam, r.name)} failed", "", "```", r.message, "```"]
    lines += ["", f"Plan sum: {plan_sum}" if plan_sum else "No plan sum (not every beam finished)."]
    return "\n".join(lines) + "\n"
