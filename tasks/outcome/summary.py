"""How a case ended: one row per beam, a markdown summary and the final message.

The physicist's first question is "which beam, on which GPU, how many tries,
where is the dose?"; the table answers it in the Prefect UI, and the final
state message answers it in the run list, in one line that says the outcome and
each cause once: "P3: 4/5 beams done; beam 6 (5G045:TX) failed after 3 attempts:
engine crashed (SIGSEGV, exit 139)", or for a case that could not start "BAD1: not
run: no RTPLAN found in the case folder (...)". The whole errors (log path, last
lines, every problem) are in the summary.
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
    qa: str = ""  # the beam's QA verdict: "pass 98.8 %", "FAIL 91.2 %", "no reference", "error"

    @property
    def label(self) -> str:
        return beam_label(self.beam, self.name)


def artifact_key(case_id: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", case_id.lower()).strip("-")
    return f"case-{slug or 'unnamed'}"[:100]


def _failed_beam(row: BeamRow) -> str:
    after = f" after {row.attempts} attempts" if (row.attempts or 0) > 1 else ""
    return f"{row.label} failed{after}: {row.cause}"


def final_message(case_id: str, rows: list[BeamRow], qa: str = "") -> str:
    """`P3: 2/3 beams done; beam 3 (2G090:TX) failed after 2 attempts: engine crashed (SIGSEGV, exit 139)`.

    With the QA verdict `qa`: `P3: 3/3 beams done; QA: 3/3 pass (98.8 %, 100 %, 99.1 %)`.
    """
    done = sum(row.state == "Completed" for row in rows)
    parts = [f"{case_id}: {done}/{len(rows)} beams done"]
    parts += [_failed_beam(row) for row in rows if row.state != "Completed"]
    return "; ".join(parts + ([qa] if qa else []))


def not_run_message(case_id: str, cause: str) -> str:
    """`BAD1: not run: no RTPLAN found in the case folder (...)`: the case stopped before any beam ran."""
    return f"{case_id}: not run: {cause}"


def not_run_markdown(case_id: str, case_dir: str, message: str, details: str) -> str:
    """The summary of a case that stopped before any beam: the message, then the whole error."""
    return f"# Case {case_id}\n\n**{message}**\n\nCase folder `{case_dir}`.\n\n```\n{details}\n```\n"


def summary_markdown(
    case: Case, rows: list[BeamRow], message: str, plan_sum: str | None, qa: str = ""
) -> str:
    failed_qa = "FAIL" in qa or "QA error" in qa
    qa_alert = [f"> **QA FAILED: {qa}** (pictures: the case's QA artifacts)", ""] if failed_qa else []
    lines = [
        f"# Case {case.case_id}",
        "",
        *qa_alert,
        f"**{message}**",
        "",
        f"Plan `{case.plan_label}` for patient `{case.patient_id}`, machine {case.machine}.",
        "",
        "| beam | name | state | GPU | attempts | duration (s) | output | QA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        duration = f"{r.duration_s:.1f}" if r.duration_s is not None else ""
        lines.append(
            f"| {r.beam} | {r.name} | {r.state} | {'' if r.gpu is None else r.gpu} | "
            f"{r.attempts or ''} | {duration} | {r.output} | {r.qa} |"
        )
    for ex in case.excluded:
        lines.append(f"\n{beam_title(ex.number, ex.name)} not simulated: {ex.reason}")
    failed = [r for r in rows if r.state != "Completed"]
    for r in failed:
        lines += ["", f"## {beam_title(r.beam, r.name)} failed", "", "```", r.message, "```"]
    lines += ["", f"Plan sum: {plan_sum}" if plan_sum else "No plan sum (not every beam finished)."]
    return "\n".join(lines) + "\n"
