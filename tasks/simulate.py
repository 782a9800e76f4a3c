"""Prefect task: simulate one beam on the configured backend (tasks/backends/adopt.py) under a GPU lease.

The task adds what Prefect gives: the GPU lease on the server (tasks/gpu), the attempt
number, retries of transient faults (a crash, a hang, an engine error, a lost
connection; bad input is not retried), the beam's log lines and a progress bar in the UI.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.logging import get_run_logger
from prefect.runtime import task_run

from config.settings import Settings
from tasks.backends import make_backend
from tasks.backends.adopt import simulate_beam
from tasks.common.errors import retry_unless_permanent
from tasks.common.throttle import every
from tasks.gpu.broker import gpu_lease
from tasks.gpu.pool import GpuPool, SkipReason
from tasks.moqui.beam import BeamInput, BeamResult
from tasks.moqui.judge import progress_of
from tasks.prefect_api.secrets import secret_value

PROGRESS_SECONDS = 2.0  # least time between two updates of a beam's progress bar


@task(
    name="simulate",
    task_run_name="simulate beam {beam.beam_number}",
    retry_condition_fn=retry_unless_permanent,
)
def simulate(settings: Settings, beam: BeamInput) -> BeamResult:
    """Prefect wrapper: logs, a progress bar in the UI, attempt number (retries set by the flow)."""
    logger = get_run_logger()
    attempt = task_run.run_count or 1
    bar = create_progress_artifact(0.0, description=f"{beam.label} engine progress")
    move_bar = every(
        PROGRESS_SECONDS, lambda done: update_progress_artifact(bar, progress=round(done * 100, 1))
    )
    pool = GpuPool.of(settings.backend)
    holder = ConcurrencyLeaseHolder(type="task_run", id=task_run.id) if task_run.id else None
    who = {"case_id": beam.case_id, "beam": beam.label}

    def take_gpu(
        *, only: Sequence[int] | None = None, skip: SkipReason | None = None
    ) -> AbstractContextManager[int]:
        return gpu_lease(pool, holder, only=only, skip=skip, who=who)

    def on_line(line: str) -> None:
        logger.debug("[engine %s] %s", beam.label, line)
        done = progress_of(line)
        if done is not None:
            move_bar(done)

    result, completed = simulate_beam(
        settings,
        make_backend(settings, secrets=secret_value),
        beam,
        attempt,
        take_gpu,
        on_line=on_line,
        notify=lambda message: logger.info("attempt %s: %s", attempt, message),
    )
    if not completed:
        logger.warning("%s: engine exited 0 without a completion line; dose file verified", beam.label)
    update_progress_artifact(bar, progress=100.0)
    return result
