"""Simulate one beam: take a GPU, pin the engine to it, run, verify, give the GPU back.

The GPU lease covers exactly the engine's lifetime. Transient faults
(crash, hang, engine error) are retried by Prefect; bad input is not.
Progress from the engine's log shows in the UI as a progress artifact.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from pydantic import BaseModel

from config.settings import Settings
from tasks.engine import engine_argv, engine_failed, progress_of, run_engine
from tasks.errors import PermanentError, retry_unless_permanent
from tasks.gpu import gpu_lease
from tasks.tps import BeamInput, with_gpu


class BeamResult(BaseModel):
    """A finished beam: what ran, where, and where its dose is (small: passed between tasks)."""

    case_id: str
    beam_number: int
    beam_name: str
    tps_path: str
    dose_file: str
    engine_log: str
    engine_command: list[str]
    input_hash: str
    host: str
    gpu: int
    attempts: int
    started: float
    ended: float


def preflight(beam: BeamInput) -> None:
    """Missing inputs are permanent: no GPU is taken for a beam that cannot run."""
    if not Path(beam.tps_path).is_file():
        raise PermanentError(
            f"case {beam.case_id}: beam {beam.beam_number} ({beam.beam_name}): {beam.tps_path} is missing"
        )


def simulate_beam(
    settings: Settings,
    beam: BeamInput,
    attempt: int,
    on_line: Callable[[str], None] | None = None,
    on_gpu: Callable[[int], None] | None = None,
    holder: ConcurrencyLeaseHolder | None = None,
) -> tuple[BeamResult, bool]:
    """Run one beam on a leased GPU; return its result and whether the completion line was seen."""
    preflight(beam)
    with gpu_lease(settings, holder) as gpu:
        with_gpu(Path(beam.tps_path), gpu)
        if on_gpu is not None:
            on_gpu(gpu)
        log_path = Path(beam.beam_dir) / f"engine-attempt-{attempt}.log"
        outcome = run_engine(settings, beam, gpu, log_path, on_line=on_line)
    if outcome.failure is not None:
        raise engine_failed(beam, gpu, outcome)
    host = settings.backend.host if settings.backend.host != "local" else socket.gethostname()
    result = BeamResult(
        case_id=beam.case_id,
        beam_number=beam.beam_number,
        beam_name=beam.beam_name,
        tps_path=beam.tps_path,
        dose_file=beam.dose_file,
        engine_log=str(outcome.run.log_path),
        engine_command=engine_argv(settings, beam, gpu),
        input_hash=beam.input_hash,
        host=host,
        gpu=gpu,
        attempts=attempt,
        started=outcome.run.started,
        ended=outcome.run.ended,
    )
    return result, outcome.saw_completion


@task(
    name="simulate",
    task_run_name="simulate beam {beam.beam_number}",
    retry_condition_fn=retry_unless_permanent,
)
def simulate(settings: Settings, beam: BeamInput) -> BeamResult:
    """Prefect wrapper: logs, a progress bar in the UI, attempt number (retries set by the flow)."""
    logger = get_run_logger()
    attempt = task_run.run_count or 1
    label = f"beam {beam.beam_number} ({beam.beam_name})"
    bar = create_progress_artifact(0.0, description=f"{label} engine progress")

    def on_line(line: str) -> None:
        logger.debug("[engine %s] %s", label, line)
        done = progress_of(line)
        if done is not None:
            update_progress_artifact(bar, progress=round(done * 100, 1))

    result, completed = simulate_beam(
        settings,
        beam,
        attempt,
        on_line=on_line,
        on_gpu=lambda gpu: logger.info("%s: attempt %s on GPU %s", label, attempt, gpu),
        holder=ConcurrencyLeaseHolder(type="task_run", id=task_run.id) if task_run.id else None,
    )
    if not completed:
        logger.warning("%s: engine exited 0 without a completion line; dose file verified", label)
    update_progress_artifact(bar, progress=100.0)
    return result
