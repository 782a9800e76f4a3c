"""What QA finds and concludes: a beam's reference, its gamma verdict, and the case's verdict."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

ReferenceKind = Literal["TPS RTDOSE", "measurement (.mcc)"]
Verdict = Literal["pass", "fail", "no reference", "error", "off"]


class QaInputError(ValueError):
    """A reference that cannot be compared with the recalculated dose; the message names both files."""


class Reference(BaseModel):
    """A file a beam's recalculated dose is compared with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beam_number: int
    kind: ReferenceKind
    path: str


class BeamQa(BaseModel):
    """One beam's QA: the gamma figures and the verdict against the action level."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beam_number: int
    verdict: Verdict
    reference: str = ""  # the reference file
    kind: str = ""
    criteria: str = ""  # "2 %/2 mm global, 5 % cutoff, 3-D"
    pass_rate: float | None = None  # % of evaluated points with gamma <= 1
    mean_gamma: float | None = None
    max_gamma: float | None = None
    points: int | None = None  # reference points evaluated (above the cutoff, inside both grids)
    action_level: float | None = None
    picture: str = ""  # PNG beside the RTDOSE
    message: str = ""  # why there is no figure (no reference, or the error)

    @property
    def shown(self) -> str:
        """For the beam table: `pass 98.8 %`, `FAIL 91.2 %`, `no reference`, `error`."""
        if self.verdict in ("pass", "fail") and self.pass_rate is not None:
            word = "pass" if self.verdict == "pass" else "FAIL"
            return f"{word} {format_percent(self.pass_rate)}"
        return self.verdict


def format_percent(value: float) -> str:
    """98.8 %, 100 % (a pass rate just below 100 is never rounded up to it)."""
    if value >= 100.0:
        return "100 %"
    return f"{min(round(value, 1), 99.9):g} %"


def case_verdict(results: list[BeamQa]) -> str:
    """`QA: 3/3 pass (98.8 %, 100 %, 99.1 %)`, `QA: 2/3 pass (...); FAIL: beam 3`; "" when no beam was
    compared (no references, or QA off: the beam table says so per beam)."""
    compared = [r for r in results if r.verdict in ("pass", "fail")]
    if not compared and not any(r.verdict == "error" for r in results):
        return ""
    passed = sum(r.verdict == "pass" for r in compared)
    rates = ", ".join(format_percent(r.pass_rate) for r in compared if r.pass_rate is not None)
    failed = [r for r in results if r.verdict == "fail"]
    errors = [r for r in results if r.verdict == "error"]
    text = f"QA: {passed}/{len(results)} pass" + (f" ({rates})" if rates else "")
    if failed:
        text += "; FAIL: beam " + ", ".join(str(r.beam_number) for r in failed)
    if errors:
        text += "; QA error: beam " + ", ".join(str(r.beam_number) for r in errors)
    missing = [r for r in results if r.verdict == "no reference"]
    if missing:
        text += "; no reference: beam " + ", ".join(str(r.beam_number) for r in missing)
    return text


def qa_failed(results: list[BeamQa]) -> bool:
    """A case whose QA must be looked at: a beam failed its action level or could not be compared."""
    return any(r.verdict in ("fail", "error") for r in results)
