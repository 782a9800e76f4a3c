"""Simulate one beam: find or launch its job on the configured backend, follow it, fetch its dose.

Adopt, don't resubmit: the beam's job folder (tasks/backends) is looked up
first. A running job is adopted (under the lease of the GPU it runs on), a
finished one is collected, only a missing or failed one is launched. The
GPU lease covers launch to engine exit: it is released as soon as the engine has
exited, before the job's wrapper hashes the output and long before the download.
Whether a run worked is decided in one place (tasks/engine.py: exit code,
log markers, dose size); a result judged bad is marked rejected in its job
folder, so the next attempt launches again. Transient faults (crash, hang,
engine error, lost connection) are retried by Prefect; bad input is not.
Progress from the engine's log shows in the UI as a progress artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from pydantic import BaseModel

from config.settings import Settings
from tasks.backends import Backend, Followed, JobState, follow, make_backend
from tasks.backends.base import FetchError
from tasks.engine import engine_failed, every, judge, progress_of, verify_dose
from tasks.errors import PermanentError, ToolError, retry_unless_permanent
from tasks.gpu import gpu_lease
from tasks.nvidia_smi import busy_gpus
from tasks.tps import BeamInput, with_gpu

PROGRESS_SECONDS = 2.0  # least time between two updates of a beam's progress bar


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
    backend: str = "local"
    job_dir: str = ""


def preflight(beam: BeamInput) -> None:
    """Missing inputs are permanent: no GPU is taken for a beam that cannot run."""
    if not Path(beam.tps_path).is_file():
        raise PermanentError(
            f"case {beam.case_id}: beam {beam.beam_number} ({beam.beam_name}): {beam.tps_path} is missing"
        )


def attempt_log(beam_dir: Path, attempt: int) -> Path:
    """A new file for this attempt's engine log: `engine-attempt-K.log`, else `engine-attempt-K-2.log`, ...

    Attempt numbers start at 1 in every run of a case, and a rerun must not overwrite the
    log that an earlier run's failure message points at. Claimed with an exclusive create,
    so two runs of one case at once never share a file.
    """
    beam_dir.mkdir(parents=True, exist_ok=True)
    copy = 1
    while True:
        path = beam_dir / (
            f"engine-attempt-{attempt}.log" if copy == 1 else f"engine-attempt-{attempt}-{copy}.log"
        )
        try:
            path.open("xb").close()
            return path
        except FileExistsError:
            copy += 1


def _run_job(
    settings: Settings,
    backend: Backend,
    beam: BeamInput,
    log_path: Path,
    on_line: Callable[[str], None] | None,
    say: Callable[[str], None],
    holder: ConcurrencyLeaseHolder | None,
) -> Followed:
    """Adopt, collect or launch the beam's job and follow it to its end."""
    label = f"beam {beam.beam_number} ({beam.beam_name})"
    who = {"case_id": beam.case_id, "beam": label}
    job = backend.lookup(beam)
    if job.state is JobState.RUNNING:
        if job.gpu not in settings.backend.gpus:
            raise ToolError(
                f"case {beam.case_id}: {label}: a job is running on GPU {job.gpu} of {job.host} "
                f"({job.dir}), which is not in backend.gpus; wait for it or stop it (pid {job.pid})"
            )
        say(f"{label}: adopting the job running on GPU {job.gpu} of {job.host} (pid {job.pid}, {job.dir})")
        with ExitStack() as lease:
            if not job.engine_ended:  # its engine still runs on that GPU
                lease.enter_context(gpu_lease(settings, holder, only=[job.gpu], who=who))
            argv = backend.engine_argv(beam, job.gpu)
            return follow(backend, job, argv, log_path, on_line, say, engine_ended=lease.close)
    if job.state is JobState.FINISHED_OK:
        say(f"{label}: collecting the job that finished on GPU {job.gpu} of {job.host} ({job.dir})")
        return follow(backend, job, backend.engine_argv(beam, job.gpu), log_path, on_line, say)
    if job.state is JobState.FINISHED_FAILED:
        why = job.problem or f"exit {job.exit_code}"
        say(f"{label}: the earlier job in {job.dir} failed ({why}); launching it again")
    backend.stage(beam)
    with ExitStack() as lease:
        gpu = lease.enter_context(gpu_lease(settings, holder, skip=busy_gpus(settings, backend), who=who))
        with_gpu(Path(beam.tps_path), gpu)
        job = backend.launch(beam, gpu)
        say(f"{label}: launched on GPU {gpu} of {job.host} (pid {job.pid}, {job.dir})")
        argv = backend.engine_argv(beam, gpu)
        return follow(backend, job, argv, log_path, on_line, say, engine_ended=lease.close)


def simulate_beam(
    settings: Settings,
    beam: BeamInput,
    attempt: int,
    on_line: Callable[[str], None] | None = None,
    notify: Callable[[str], None] | None = None,
    holder: ConcurrencyLeaseHolder | None = None,
    backend: Backend | None = None,
) -> tuple[BeamResult, bool]:
    """Run one beam to a verified local dose file; return its result and whether the engine said done."""
    preflight(beam)
    backend = backend or make_backend(settings)
    say = notify or (lambda message: None)
    log_path = attempt_log(Path(beam.beam_dir), attempt)
    followed = _run_job(settings, backend, beam, log_path, on_line, say, holder)
    job, run = followed.job, followed.run
    failure, completed = judge(run, followed.lines, settings)
    if failure is None:
        try:
            backend.fetch(beam, job)  # the GPU is already released
        except FetchError as error:
            failure = str(error)
    failure = failure or verify_dose(settings, beam)
    if failure is not None:
        if job.problem:
            failure = f"{failure}: {job.problem}"
        if job.state is JobState.FINISHED_OK:  # exit 0, but not acceptable: relaunch next time
            backend.reject(job, failure)
        raise engine_failed(beam, job.gpu, job.host or backend.where, failure, run)
    backend.cleanup(beam, job)
    result = BeamResult(
        case_id=beam.case_id,
        beam_number=beam.beam_number,
        beam_name=beam.beam_name,
        tps_path=beam.tps_path,
        dose_file=beam.dose_file,
        engine_log=str(run.log_path),
        engine_command=run.argv,
        input_hash=beam.input_hash,
        host=job.host,
        gpu=job.gpu,
        attempts=attempt,
        started=run.started,
        ended=run.ended,
        backend=backend.kind,
        job_dir=job.dir,
    )
    return result, completed


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
    move_bar = every(
        PROGRESS_SECONDS, lambda done: update_progress_artifact(bar, progress=round(done * 100, 1))
    )

    def on_line(line: str) -> None:
        logger.debug("[engine %s] %s", label, line)
        done = progress_of(line)
        if done is not None:
            move_bar(done)

    result, completed = simulate_beam(
        settings,
        beam,
        attempt,
        on_line=on_line,
        notify=lambda message: logger.info("attempt %s: %s", attempt, message),
        holder=ConcurrencyLeaseHolder(type="task_run", id=task_run.id) if task_run.id else None,
    )
    if not completed:
        logger.warning("%s: engine exited 0 without a completion line; dose file verified", label)
    update_progress_artifact(bar, progress=100.0)
    return result
