"""Decide, from exit code, log markers and output, whether MOQUI's run of a beam worked.

The old orchestrator looked for the wrong completion marker and left beams
at 70 % forever. The rules here (DOMAIN.md): a failure marker or a non-zero
exit fails the run; a signal (or 139 from a shell) is a crash; exit 0 without
a failure marker is a success only if the dose file exists with the size the
phantom grid implies.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from config.settings import Settings, python_executable
from tasks.errors import ToolError
from tasks.moqui_input import PhantomGrid, read_tps
from tasks.toolrun import ToolRun
from tasks.tps import BeamInput

PROGRESS = re.compile(r"Generating particles for \((\d+) of (\d+) batches\)")


def format_engine_command(template: list[str], beam: BeamInput, gpu: int, input_path: str) -> list[str]:
    """The engine's argv from a command template (placeholders checked when the config loaded)."""
    fields = {
        "python": python_executable(),
        "input": input_path,
        "case_id": beam.case_id,
        "beam_number": str(beam.beam_number),
        "gpu": str(gpu),
    }
    return [part.format(**fields) for part in template]


def engine_argv(settings: Settings, beam: BeamInput, gpu: int) -> list[str]:
    """The local engine's argv (engine.command), reading the beam's own moqui_tps.in."""
    return format_engine_command(settings.engine.command, beam, gpu, beam.tps_path)


def progress_of(line: str) -> float | None:
    """Fraction done from a `Generating particles for (k of N batches)` line."""
    match = PROGRESS.search(line)
    if not match or int(match.group(2)) == 0:
        return None
    return int(match.group(1)) / int(match.group(2))


def every(
    seconds: float, update: Callable[[float], None], clock: Callable[[], float] = time.monotonic
) -> Callable[[float], None]:
    """`update`, but skipped when it last ran less than `seconds` ago.

    The engine may log thousands of batches; each progress-bar update is a write to the
    Prefect server that every case run shares, and a bar moved every few seconds is enough.
    """
    last: float | None = None

    def maybe(value: float) -> None:
        nonlocal last
        now = clock()
        if last is None or now - last >= seconds:
            last = now
            update(value)

    return maybe


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def judge(run: ToolRun, lines: list[str], settings: Settings) -> tuple[str | None, bool]:
    """(failure message or None, whether the completion marker was seen)."""
    seen_done = any(m in line for line in lines for m in settings.engine.success_markers)
    failures = [line for line in lines if any(m in line for m in settings.engine.failure_markers)]
    code = run.returncode
    if run.timed_out:
        return f"engine did not finish within {settings.engine.timeout_seconds:g} s and was killed", seen_done
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


def expected_dose_bytes(settings: Settings, tps_path: Path) -> int | None:
    """Size of a raw dose file for this input (float64 per voxel); None for other formats."""
    if settings.tps.output_format != "raw":
        return None
    return PhantomGrid.from_tps(read_tps(tps_path), str(tps_path)).voxel_count * 8


def verify_dose(settings: Settings, beam: BeamInput) -> str | None:
    """Why the engine's dose file is not acceptable, or None if it is."""
    dose = Path(beam.dose_file)
    if not dose.is_file():
        found = sorted(p.name for p in Path(beam.dose_dir).glob("*")) or ["nothing"]
        return f"engine wrote no dose file {dose.name} in {beam.dose_dir} (found: {', '.join(found)})"
    expected = expected_dose_bytes(settings, Path(beam.tps_path))
    size = dose.stat().st_size
    if expected is not None and size != expected:
        return f"dose file {dose} has {size} bytes, expected {expected} (nx*ny*nz*8)"
    return None


def engine_failed(beam: BeamInput, gpu: int, host: str, failure: str, run: ToolRun) -> ToolError:
    return ToolError(
        f"case {beam.case_id}: beam {beam.beam_number} ({beam.beam_name}) on GPU {gpu} of {host}: {failure}; "
        f"log {run.log_path}; last lines:\n{run.tail_text(15)}"
    )
