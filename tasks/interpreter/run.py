"""Run the interpreter once per case: plan + delivery logs -> per-layer CSVs, checked.

The old orchestrator killed the interpreter after a hidden 30 s timeout; here
the timeout is a setting, the tool's output is kept in a log file and in the
run log, and a failure carries the last lines of that output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from config.settings import Settings, python_executable
from tasks.casefolder import Case
from tasks.common.errors import PermanentError, ToolError
from tasks.common.toolrun import run_tool


def csv_dir(settings: Settings, case: Case) -> Path:
    return settings.work_dir(case.case_id) / "Log_csv"


def interpreter_argv(settings: Settings, case: Case, out_dir: Path) -> list[str]:
    fields = {
        "python": python_executable(),
        "case_dir": case.case_dir,
        "csv_dir": str(out_dir),
        "case_id": case.case_id,
    }
    return [part.format(**fields) for part in settings.interpreter.command]


def check_interpreter_output(case: Case, out_dir: Path) -> None:
    """Every treatment beam must have its layer CSVs, or the engine would run on nothing."""
    if not any((out_dir / "plan").glob("*")):
        raise ToolError(f"case {case.case_id}: the interpreter wrote no plan copy in {out_dir / 'plan'}")
    for beam in case.beams:
        beam_dir = out_dir / "log" / beam.csv_dir_name
        if not any(beam_dir.glob("*.csv")):
            raise ToolError(
                f"case {case.case_id}: beam {beam.number} ({beam.name}): "
                f"the interpreter wrote no layer CSVs in {beam_dir}"
            )


def run_interpreter(settings: Settings, case: Case, on_line: Callable[[str], None] | None = None) -> Path:
    """Run the configured interpreter on the case; return its output folder (Log_csv)."""
    out_dir = csv_dir(settings, case)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(settings.interpreter.workdir) if settings.interpreter.workdir else out_dir.parent
    if not workdir.is_dir():
        raise PermanentError(f"interpreter workdir {workdir} does not exist")
    argv = interpreter_argv(settings, case, out_dir)
    try:
        run = run_tool(
            argv,
            cwd=workdir,
            log_path=out_dir.parent / "logs" / "interpreter.log",
            timeout=settings.interpreter.timeout_seconds,
            on_line=on_line,
        )
    except OSError as err:
        raise PermanentError(
            f"case {case.case_id}: cannot start the interpreter {argv[0]!r}: {err}"
        ) from None
    if run.timed_out:
        raise ToolError(
            f"case {case.case_id}: the interpreter did not finish within "
            f"{settings.interpreter.timeout_seconds:g} s and was killed; last output:\n{run.tail_text()}"
        )
    if run.returncode != 0:
        raise ToolError(
            f"case {case.case_id}: the interpreter exited with code {run.returncode} "
            f"(log {run.log_path}); last output:\n{run.tail_text()}"
        )
    check_interpreter_output(case, out_dir)
    return out_dir
