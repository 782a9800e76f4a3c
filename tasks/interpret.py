"""Prefect task: run the interpreter once per case (tasks/interpreter), its output in the run log."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from config.settings import Settings
from tasks.casefolder import Case
from tasks.interpreter.run import run_interpreter


@task(name="interpret", task_run_name="interpret {case.case_id}")
def interpret(settings: Settings, case: Case) -> str:
    """Prefect wrapper: the interpreter's output folder, its output in the run log."""
    logger = get_run_logger()
    return str(run_interpreter(settings, case, on_line=lambda line: logger.info("[interpreter] %s", line)))
