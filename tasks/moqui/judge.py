"""Decide, from exit code, log markers and output, whether MOQUI's run of a beam worked.

An old orchestrator looked for the wrong completion marker and left beams at 70 %
forever. The rules here: a failure marker or a non-zero exit fails the run; a signal
(or 128 + signal from a shell) is a crash; exit 0 without a failure marker is a success
only if the dose file exists with the size the phantom grid implies. Progress comes
from the engine's `Generating particles for (k of N batches)` lines.
"""

from __future__ import annotations

import re
import signal

from config.settings import EngineSettings
from tasks.common.errors import ToolError
from tasks.common.toolrun import ToolRun
from tasks.moqui.beam import BeamInput

PROGRESS = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")


def progress_of(line: str) -> float | None:
    """Fraction done from a `Generating particles for (k of N batches)` line."""
    match = PROGRESS.search(line)
    if not match or int(match.group(2)) == 0:
        return None
    return int(match.group(1)) / int(match.group(2))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def judge(run: ToolRun, lines: list[str], engine: EngineSettings) -> tuple[str | None, bool]:
    """(failure cause or None, whether the completion marker was seen)."""
    seen_done = any(m in line for line in lines for m in engine.success_markers)
    failures = [line for line in lines if any(m in line for m in engine.failure_markers)]
    code = run.returncode
    if run.timed_out:
        return f"engine did not finish within {engine.timeout_seconds:g} s and was killed", seen_done
    if code is None:
        return "engine ended without an exit code", seen_done
    if code < 0 or code > 128:
        number = -code if code < 0 else code - 128
        return f"engine crashed ({_signal_name(number)}, exit {code})", seen_done
    if failures:
        return f"engine reported: {failures[-1].strip()} (exit {code})", seen_done
    if code != 0:
        return f"engine exited with code {code}", seen_done
    return None, seen_done


def verify_dose(beam: BeamInput, raw: bool) -> str | None:
    """Why the engine's dose file is not acceptable, or None if it is (`raw`: its size is known)."""
    dose = beam.dose_file
    if not dose.is_file():
        found = sorted(p.name for p in beam.dose_dir.glob("*")) or ["nothing"]
        return f"engine wrote no dose file {dose.name} in {beam.dose_dir} (found: {', '.join(found)})"
    size = dose.stat().st_size
    if raw and size != beam.dose_bytes:
        return f"dose file {dose} has {size} bytes, expected {beam.dose_bytes} (nx*ny*nz*8)"
    return None


def engine_failed(beam: BeamInput, gpu: int, host: str, failure: str, run: ToolRun) -> ToolError:
    """The error of a failed engine run: standalone message with the log tail, `failure` as its cause."""
    return ToolError(
        f"{beam.subject} on GPU {gpu} of {host}: {failure}; log {run.log_path}; "
        f"last lines:\n{run.tail_text(15)}",
        cause=failure,
    )
