"""One beam's job from start to verified dose: adopt a running job, collect a finished one, or launch.

Adopt, don't resubmit: the beam's job folder is looked up first. A running job is
adopted (under the lease of the GPU it runs on), a finished one is collected, only a
missing or failed one is launched. The GPU is held from launch to engine exit: it is let
go as soon as the engine has exited, before the job's wrapper hashes the output and long
before the download. Whether a run worked is decided in one place (tasks/moqui/judge.py:
exit code, log markers, dose size); a result judged bad is marked rejected in its job
folder, so the next attempt launches again.

The run that launches or adopts a job records itself as its holder in the job folder
(Holder: its flow run and GPU lease), so that a later run adopting the job can tell
whether the holder is gone and take its GPU at once (tasks/gpu/takeover.py), and a
cancelled run's jobs can be found and stopped (deployments/reconcile.py).

Plain code, no Prefect: how a GPU is held is handed in (`TakeGpu`; the simulate task
passes the server-side lease of tasks/gpu).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Protocol

from config.settings import Settings
from tasks.backends.base import Backend, FetchError, Followed, Holder, Job, JobState, follow
from tasks.casefolder.content import check_unchanged
from tasks.common import stopping
from tasks.common.errors import PermanentError, ToolError, cause_of
from tasks.dose.calibration import dose_scale, raw_dose_problem
from tasks.gpu.nvidia_smi import busy_gpus
from tasks.gpu.pool import QUEUE_PLACE, SkipReason
from tasks.moqui.beam import BeamInput, BeamResult
from tasks.moqui.judge import bad_output, dose_size_problem, engine_failed, judge, run_facts


class TakeGpu(Protocol):
    """Hold one GPU for the block and yield the record of that hold (its `gpu`, lease and run).

    The GPU is one of `only`, or any not passed over by `skip`.
    """

    def __call__(
        self, *, only: Sequence[int] | None = None, skip: SkipReason | None = None
    ) -> AbstractContextManager[Holder]: ...


# Given the holder a found job records: if that holder is gone, release the GPU lease it left.
LetGo = Callable[[Holder], None]


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
    let_go: LetGo | None = None,
    on_job: Callable[[Job], None] | None = None,
) -> Followed:
    """Adopt, collect or launch the beam's job and follow it to its end.

    A job found in any state may name a holder that was killed holding its GPU's lease
    (while the engine ran, or after it ended and before the lease was given back): that
    lease is let go first, so the GPU does not stay idle until the lease expires. On a
    capped Slurm queue (`backend.queue_slots`) `take_gpu` gives a place in that queue instead
    of a GPU, held from before sbatch until Slurm has ended the job, and let go the same way.
    """
    job = backend.lookup(beam)
    leased = backend.gpu_leases or backend.queue_slots
    if let_go is not None and leased and job.state is not JobState.MISSING:
        previous = backend.holder(job)
        if previous is not None:
            let_go(previous)
    if job.state is JobState.RUNNING:
        if backend.gpu_leases and job.gpu not in settings.backend.gpus:
            raise ToolError(
                f"{beam.subject}: a job is running on GPU {job.gpu} of {job.host} "
                f"({job.dir}), which is not in backend.gpus; wait for it or stop it (pid {job.pid})"
            )
        say(f"{beam.label}: adopting the job running {backend.describe(job)}")
        with ExitStack() as queued, ExitStack() as held:
            if backend.gpu_leases and not job.engine_ended:  # its engine still runs on that GPU
                backend.hold(job, held.enter_context(take_gpu(only=[job.gpu])))
            if backend.queue_slots:  # it is in the queue: it holds a place there
                backend.hold(job, queued.enter_context(take_gpu(only=[QUEUE_PLACE])))
            stopping.check(f"adopting the job of {beam.label}", engine_running=not job.engine_ended)
            argv = backend.engine_argv(beam, job.gpu)
            return _follow_out_of_queue(backend, job, argv, log_path, on_line, say, held, on_job)
    if job.state is JobState.FINISHED_OK:
        say(f"{beam.label}: collecting the job that finished {backend.describe(job)}")
        return follow(backend, job, backend.engine_argv(beam, job.gpu), log_path, on_line, say, on_job=on_job)
    if job.state is JobState.FINISHED_FAILED:
        why = job.problem or f"exit {job.exit_code}"
        say(f"{beam.label}: the earlier job in {job.dir} failed ({why}); launching it again")
    backend.stage(beam)
    with ExitStack() as queued, ExitStack() as held:
        gpu, holder = 0, None  # without leases the scheduler picks the GPU, which the engine sees as 0
        if backend.gpu_leases:
            holder = held.enter_context(take_gpu(skip=busy_gpus(settings.backend, backend)))
            gpu = holder.gpu
        elif backend.queue_slots:  # a place in the capped queue before sbatch
            holder = queued.enter_context(take_gpu())
        stopping.check(f"launching {beam.label} on GPU {gpu}")  # a GPU taken as the signal came
        # The wait for a GPU may have been long: a case folder renamed or changed meanwhile
        # stops here, before GPU time is spent on inputs that are no longer the case's.
        check_unchanged(beam.case_content)
        argv = backend.engine_argv(beam, gpu)
        job = backend.launch(beam, gpu, argv)
        if holder is not None:
            backend.hold(job, holder)
        say(f"{beam.label}: launched {backend.describe(job)}")
        return _follow_out_of_queue(backend, job, argv, log_path, on_line, say, held, on_job)


def _follow_out_of_queue(
    backend: Backend,
    job: Job,
    argv: list[str],
    log_path: Path,
    on_line: Callable[[str], None] | None,
    say: Callable[[str], None],
    held: ExitStack,
    on_job: Callable[[Job], None] | None,
) -> Followed:
    """Follow the job (its GPU, `held`, let go as its engine exits) until the scheduler has ended it
    too, so that a place in a capped queue is given back only once the job is out of the queue."""
    followed = follow(backend, job, argv, log_path, on_line, say, engine_ended=held.close, on_job=on_job)
    if backend.queue_slots:
        backend.left_queue(followed.job)
    return followed


def simulate_beam(
    settings: Settings,
    backend: Backend,
    beam: BeamInput,
    attempt: int,
    take_gpu: TakeGpu,
    on_line: Callable[[str], None] | None = None,
    notify: Callable[[str], None] | None = None,
    let_go: LetGo | None = None,
    on_job: Callable[[Job], None] | None = None,
) -> tuple[BeamResult, bool]:
    """Run one beam to a verified local dose file; return its result and whether the engine said done.

    A run that failed is retried (ToolError); a run that exited cleanly but cannot have computed
    this beam's dose (no histories, other spot records than staged, a zero, non-finite or
    implausible dose) is bad output: PermanentError, not retried.
    """
    preflight(beam)
    say = notify or (lambda message: None)
    log_path = attempt_log(Path(beam.beam_dir), attempt)
    followed = run_job(settings, backend, beam, take_gpu, log_path, on_line, say, let_go, on_job)
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
        error = engine_failed(beam, job.gpu, job.host or backend.where, failure, run, attempt)
        if job.queued is not None and not job.queued.retry:  # e.g. TIMEOUT, CANCELLED: again would not help
            raise PermanentError(str(error), cause=failure)
        raise error
    assert dose is not None
    bad = bad_output(beam, verdict)
    if bad is None and settings.tps.output_format == "raw":
        bad = raw_dose_problem(dose, beam.grid, dose_scale(settings), settings.dose.plausible_max_gy)
    if bad is not None:
        raise PermanentError(
            f"{beam.subject}: bad output of the engine on GPU {job.gpu} of {job.host or backend.where}: "
            f"{bad}; log {run.log_path}",
            cause=f"bad output: {bad}",
            facts=run_facts(job.gpu, attempt, run),
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
