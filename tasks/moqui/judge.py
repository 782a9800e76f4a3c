"""Decide, from exit code, log lines and output, whether MOQUI's run of a beam worked.

An old orchestrator looked for the wrong completion marker and left beams at 70 %
forever; the public engine exits 0 after printing `Cannot write :<file>`, after reading
no spots and after running zero histories. So the rules, with the markers of the
engine's profile: a failure marker or a non-zero exit fails the run; a signal (or 128 +
signal from a shell) is a crash; exit 0 is a success only if the engine ran histories,
read exactly the staged spot records, and wrote the dose file with the size its grid
implies. Progress comes from its `Generating particles for (k of N batches)` lines.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path

from config.profiles import EngineProfile
from config.settings import EngineSettings
from tasks.common.errors import ToolError
from tasks.common.toolrun import ToolRun
from tasks.moqui.beam import BeamInput

PROGRESS = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")


def progress_of(line: str) -> tuple[int, int] | None:
    """(k, N) from a `Generating particles for (k of N batches)` line: batch k of N is under way."""
    match = PROGRESS.search(line)
    if not match or int(match.group(2)) == 0:
        return None
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class Verdict:
    """What the engine's log and exit code say about a run."""

    failure: str | None  # the cause, when the run failed
    completed: bool  # its completion line was seen
    histories: int | None  # as its log reported them (None: the profile does not say how)
    beamlets: int | None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _reported(pattern: str | None, lines: list[str]) -> int | None:
    if pattern is None:
        return None
    values = [int(match.group(1)) for line in lines if (match := re.search(pattern, line))]
    return values[-1] if values else None


def _failure(run: ToolRun, lines: list[str], engine: EngineSettings, profile: EngineProfile) -> str | None:
    failures = [line.strip() for line in lines if any(m in line for m in profile.failure_markers)]
    code = run.returncode
    if run.timed_out:
        return f"engine did not finish within {engine.timeout_seconds:g} s and was killed"
    if code is None:
        return "engine ended without an exit code"
    if failures:
        return f"engine reported: {failures[-1]} (exit {code})"
    if code < 0 or 128 < code <= 128 + 64:  # killed by a signal (a shell reports 128 + its number)
        number = -code if code < 0 else code - 128
        return f"engine crashed ({_signal_name(number)}, exit {code})"
    if code != 0:
        meaning = profile.exit_codes.get(code)
        return f"engine exited with code {code}" + (f": {meaning}" if meaning else "")
    return None


def judge(run: ToolRun, lines: list[str], engine: EngineSettings, profile: EngineProfile) -> Verdict:
    """The verdict on a finished run, from its exit code and every line of its log."""
    return Verdict(
        failure=_failure(run, lines, engine, profile),
        completed=any(m in line for line in lines for m in profile.success_markers),
        histories=_reported(profile.histories_line, lines),
        beamlets=_reported(profile.beamlets_line, lines),
    )


def bad_output(beam: BeamInput, verdict: Verdict) -> str | None:
    """Why a run that exited cleanly cannot have computed this beam's dose, if it cannot.

    Running it again on the same inputs gives the same result: it is not retried.
    """
    if verdict.beamlets is not None and verdict.beamlets != beam.records:
        return (
            f"the engine read {verdict.beamlets} spot records, but the beam's staged layer CSVs hold "
            f"{beam.records}: it did not read this beam's delivery logs as written"
        )
    if verdict.histories == 0:
        return (
            "the engine ran 0 histories: every spot record's count x particles_per_history is below 1 "
            "(raise tps.particles_per_history)"
        )
    return None


def dose_size_problem(beam: BeamInput, dose: Path, raw: bool) -> str | None:
    """Why the engine's dose file is not the size its grid implies (`raw`: the size is known)."""
    size = dose.stat().st_size
    if raw and size != beam.dose_bytes:
        return f"dose file {dose} has {size} bytes, expected {beam.dose_bytes} (nx*ny*nz*8)"
    return None


def run_facts(gpu: int, attempt: int, run: ToolRun) -> dict[str, float]:
    """What the beam table shows of a run that failed: its GPU, attempt number and engine time."""
    return {"gpu": gpu, "attempts": attempt, "seconds": round(run.ended - run.started, 1)}


def engine_failed(
    beam: BeamInput, gpu: int, host: str, failure: str, run: ToolRun, attempt: int
) -> ToolError:
    """The error of a failed engine run: standalone message with the log tail, `failure` as its cause."""
    return ToolError(
        f"{beam.subject} on GPU {gpu} of {host}: {failure}; log {run.log_path}; "
        f"last lines:\n{run.tail_text(15)}",
        cause=failure,
        facts=run_facts(gpu, attempt, run),
    )
