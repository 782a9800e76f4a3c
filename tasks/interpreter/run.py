"""Run the interpreter once per case: plan + delivery logs -> per-layer CSVs, checked.

It runs on a staged copy of the case (tasks/interpreter/staging.py: the plan and one
delivery per treatment beam, in plan order) into an output folder emptied first (it
never removes a file it did not write, and the engine would read a stale one). The old
orchestrator killed the interpreter after a hidden 30 s timeout; here the timeout is a
setting, the tool's output is kept in a log file and in the run log, and a failure
carries the last lines of that output. Its output is checked: every treatment beam must
have one non-empty layer CSV per energy layer of the plan.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from config.settings import Settings, python_executable
from tasks.casefolder import Case
from tasks.common.errors import PermanentError, ToolError
from tasks.common.labels import beam_subject
from tasks.common.toolrun import run_tool
from tasks.interpreter.staging import stage_interpreter_input


def csv_dir(settings: Settings, case: Case) -> Path:
    return settings.work_dir(case.case_id) / "Log_csv"


def interpreter_argv(settings: Settings, case: Case, case_input: Path, out_dir: Path) -> list[str]:
    """The interpreter's argv; {case_dir} is the staged copy of the case it reads."""
    fields = {
        "python": python_executable(),
        "case_dir": str(case_input),
        "csv_dir": str(out_dir),
        "case_id": case.case_id,
    }
    return [part.format(**fields) for part in settings.interpreter.command]


def check_interpreter_output(case: Case, out_dir: Path) -> None:
    """One non-empty layer CSV per energy layer of every treatment beam, or the engine would run wrong."""
    if not any((out_dir / "plan").glob("*")):
        raise ToolError(f"case {case.case_id}: the interpreter wrote no plan copy in {out_dir / 'plan'}")
    for beam in case.beams:
        subject = beam_subject(case.case_id, beam.number, beam.name)
        beam_dir = out_dir / "log" / beam.csv_dir_name
        layers = sorted(beam_dir.glob("*.csv"))
        if len(layers) != beam.layers:
            raise ToolError(
                f"{subject}: the interpreter wrote {len(layers)} layer CSVs in {beam_dir}, "
                f"the plan has {beam.layers} energy layers"
            )
        empty = [path.name for path in layers if path.stat().st_size == 0]
        if empty:
            raise ToolError(
                f"{subject}: the interpreter wrote empty layer CSVs in {beam_dir}: {', '.join(empty)}"
            )


def run_interpreter(settings: Settings, case: Case, on_line: Callable[[str], None] | None = None) -> Path:
    """Run the configured interpreter on the case; return its output folder (Log_csv)."""
    out_dir = csv_dir(settings, case)
    shutil.rmtree(out_dir, ignore_errors=True)  # ours: only what an earlier run of it wrote
    out_dir.mkdir(parents=True)
    workdir = Path(settings.interpreter.workdir) if settings.interpreter.workdir else out_dir.parent
    if not workdir.is_dir():
        raise PermanentError(f"interpreter workdir {workdir} does not exist")
    case_input = stage_interpreter_input(case, out_dir.parent / "interpreter-input" / case.case_id)
    argv = interpreter_argv(settings, case, case_input, out_dir)
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
        last = run.tail_text().strip().splitlines()
        raise ToolError(
            f"case {case.case_id}: the interpreter exited with code {run.returncode} "
            f"(log {run.log_path}); last output:\n{run.tail_text()}",
            cause=f"the interpreter exited with code {run.returncode}" + (f": {last[-1]}" if last else ""),
        )
    check_interpreter_output(case, out_dir)
    return out_dir
