"""One beam's job from start to verified dose: adopt a running job, collect a finished one, or launch.

Adopt, don't resubmit: the beam's job folder is looked up first. A running job is
adopted (under the lease of the GPU it runs on), a finished one is collected, only a
missing or failed one is launched. The GPU is held from launch to engine exit: it is let
go as soon as the engine has exited, before the job's wrapper hashes the output and long
before the download. Whether a run worked is decided in one place (tasks/moqui/judge.py:
exit code, log markers, dose size); a result judged bad is marked rejected in its job
folder, so the next attempt launches again.

Plain code, no Prefect: how a GPU is held is handed in (`TakeGpu`; the simulate task
passes the server-side lease of tasks/gpu).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Protocol

from config.settings import Settings
from tasks.backends.base import Backend, FetchError, Followed, JobState, follow
from tasks.common.errors import PermanentError, ToolError, cause_of
from tasks.dose.calibration import dose_scale, raw_dose_problem
from tasks.gpu.nvidia_smi import busy_gpus
from tasks.gpu.pool import SkipReason
from tasks.moqui.beam import BeamInput, BeamResult
from tasks.moqui.judge import bad_output, dose_size_problem, engine_failed, judge


class TakeGpu(Protocol):
    """Hold one GPU for the block and yield its index: one of `only`, or any not passed over by `skip`."""

    def __call__(
        self, *, only: Sequence[int] | None = None, skip: SkipReason | None = None
    ) -> AbstractContextManager[int]: ...


def preflight(beam: BeamInput) -> None:
    """Missing inputs are permanent: no GPU is taken for a beam that cannot run."""
    layers = Path(beam.stage_dir) / "log"
    if not any(layers.glob("*/*.csv")):
        raise PermanentError(f"{beam.subject}: no layer CSVs in {layers} (its staged input)")


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


def run_job(
    settings: Settings,
    backend: Backend,
    beam: BeamInput,
    take_gpu: TakeGpu,
    log_path: Path,
    on_line: Callable[[str], None] | None,
    say: Callable[[str], None],
) -> Followed:
    """Adopt, collect or launch the beam's job and follow it to its end."""
    job = backend.lookup(beam)
    if job.state is JobState.RUNNING:
        if job.gpu not in settings.backend.gpus:
            raise ToolError(
                f"{beam.subject}: a job is running on GPU {job.gpu} of {job.host} "
                f"({job.dir}), which is not in backend.gpus; wait for it or stop it (pid {job.pid})"
            )
        say(
            f"{beam.label}: adopting the job running on GPU {job.gpu} of {job.host} "
            f"(pid {job.pid}, {job.dir})"
        )
        with ExitStack() as held:
            if not job.engine_ended:  # its engine still runs on that GPU
                held.enter_context(take_gpu(only=[job.gpu]))
            argv = backend.engine_argv(beam, job.gpu)
            return follow(backend, job, argv, log_path, on_line, say, engine_ended=held.close)
    if job.state is JobState.FINISHED_OK:
        say(f"{beam.label}: collecting the job that finished on GPU {job.gpu} of {job.host} ({job.dir})")
        return follow(backend, job, backend.engine_argv(beam, job.gpu), log_path, on_line, say)
    if job.state is JobState.FINISHED_FAILED:
        why = job.problem or f"exit {job.exit_code}"
        say(f"{beam.label}: the earlier job in {job.dir} failed ({why}); launching it again")
    backend.stage(beam)
    with ExitStack() as held:
        gpu = held.enter_context(take_gpu(skip=busy_gpus(settings.backend, backend)))
        argv = backend.engine_argv(beam, gpu)
        job = backend.launch(beam, gpu, argv)
        say(f"{beam.label}: launched on GPU {gpu} of {job.host} (pid {job.pid}, {job.dir})")
        return follow(backend, job, argv, log_path, on_line, say, engine_ended=held.close)


def simulate_beam(
    settings: Settings,
    backend: Backend,
    beam: BeamInput,
    attempt: int,
    take_gpu: TakeGpu,
    on_line: Callable[[str], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> tuple[BeamResult, bool]:
    """Run one beam to a verified local dose file; return its result and whether the engine said done.

    A run that failed is retried (ToolError); a run that exited cleanly but cannot have computed
    this beam's dose (no histories, other spot records than staged, a zero, non-finite or
    implausible dose) is bad output: PermanentError, not retried.
    """
    preflight(beam)
    say = notify or (lambda message: None)
    log_path = attempt_log(Path(beam.beam_dir), attempt)
    followed = run_job(settings, backend, beam, take_gpu, log_path, on_line, say)
    job, run = followed.job, followed.run
    verdict = judge(run, followed.lines, settings.engine, settings.engine_profile)
    failure, dose = verdict.failure, None
    if failure is None:
        try:
            dose = backend.fetch(beam, job)  # the GPU is already released
        except FetchError as error:
            failure = cause_of(error, beam.subject)
    if failure is None and dose is not None:
        failure = dose_size_problem(beam, dose, raw=settings.tps.output_format == "raw")
    if failure is not None:
        if job.problem:
            failure = f"{failure}: {job.problem}"
        if job.state is JobState.FINISHED_OK:  # exit 0, but not acceptable: relaunch next time
            backend.reject(job, failure)
        raise engine_failed(beam, job.gpu, job.host or backend.where, failure, run)
    assert dose is not None
    bad = bad_output(beam, verdict)
    if bad is None and settings.tps.output_format == "raw":
        bad = raw_dose_problem(dose, beam.grid, dose_scale(settings), settings.dose.plausible_max_gy)
    if bad is not None:
        raise PermanentError(
            f"{beam.subject}: bad output of the engine on GPU {job.gpu} of {job.host or backend.where}: "
            f"{bad}; log {run.log_path}",
            cause=f"bad output: {bad}",
        )
    backend.cleanup(beam, job)
    result = BeamResult(
        beam=beam,
        dose_file=str(dose),
        histories=verdict.histories,
        beamlets=verdict.beamlets,
        engine_log=str(run.log_path),
        engine_command=run.argv,
        host=job.host,
        gpu=job.gpu,
        attempts=attempt,
        started=run.started,
        ended=run.ended,
        backend=backend.kind,
        job_dir=job.dir,
    )
    return result, verdict.completed
