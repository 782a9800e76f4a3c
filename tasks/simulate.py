"""Prefect task: simulate one beam on the configured backend (tasks/backends/adopt.py) under a GPU lease.

The task adds what Prefect gives: the GPU lease on the server (tasks/gpu), the attempt
number, retries of transient faults (a crash, a hang, an engine error, a lost
connection; bad input is not retried), the beam's log lines and a progress bar in the UI.
What a physicist needs to tell a waiting beam from a simulating one is in its log: "waiting
for a GPU (2/2 leased: P2 beams 2, 3)", "got GPU 1 after 34 s", and the engine's batch k of N
at most every PROGRESS_LOG_SECONDS. On a capped Slurm queue a beam waits for a place in that
queue instead ("waiting for a place in Slurm's queue (2/2 taken)"), and while its job is
pending the progress bar says so: "beam 2 (...): Slurm job 123 pending: Resources (40 s)".
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from uuid import UUID

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.logging import get_run_logger
from prefect.runtime import flow_run, task_run

from config.settings import Settings
from tasks.backends import make_backend
from tasks.backends.adopt import simulate_beam
from tasks.backends.base import Holder, Job
from tasks.common.errors import retry_unless_permanent
from tasks.common.throttle import every
from tasks.gpu.broker import gpu_lease
from tasks.gpu.limits import gpu_status, leased_text, places_text
from tasks.gpu.pool import GpuPool, SkipReason, SlurmQueue, holder_pool
from tasks.gpu.takeover import take_over
from tasks.moqui.beam import BeamInput, BeamResult
from tasks.moqui.judge import progress_of
from tasks.prefect_api.secrets import secret_value

PROGRESS_SECONDS = 5.0  # least time between two updates of a beam's progress bar (each a write on the server)
PROGRESS_LOG_SECONDS = 10.0  # least time between two "batch k of N" lines in the beam's log
WAITING_SAY_SECONDS = 1.0  # a beam that has no GPU after this long says that it waits, and for whom


@task(
    name="simulate",
    task_run_name="simulate beam {beam.beam_number}",
    retry_condition_fn=retry_unless_permanent,
)
def simulate(settings: Settings, beam: BeamInput) -> BeamResult:
    """Prefect wrapper: logs, a progress bar in the UI, attempt number (retries set by the flow)."""
    logger = get_run_logger()
    attempt = task_run.run_count or 1
    engine_text = f"{beam.label} engine progress"
    bar: list[UUID] = []  # the beam's progress bar, made by the first update the server takes

    def show_progress(percent: float, description: str | None = None) -> None:
        """The bar is for people: a server that refuses an update (restarting) must not fail the beam."""
        text = description or engine_text
        try:
            if bar:
                update_progress_artifact(bar[0], progress=percent, description=text)
            else:
                bar.append(create_progress_artifact(percent, description=text))
        except Exception as error:
            logger.warning("%s: progress bar not updated (%s: %s)", beam.label, type(error).__name__, error)

    show_progress(0.0)

    move_bar = every(PROGRESS_SECONDS, lambda done: show_progress(round(done * 100, 1)))
    backend = make_backend(settings, secrets=secret_value)
    pending = PendingBar(beam.label, engine_text, backend.waiting, lambda text: show_progress(0.0, text))
    pool = holder_pool(settings)  # a GPU, or a place in a capped Slurm queue
    lease_holder = ConcurrencyLeaseHolder(type="task_run", id=task_run.id) if task_run.id else None
    who = {"case_id": beam.case_id, "beam": beam.label, "beam_number": str(beam.beam_number)}
    run_id, run_count = flow_run.id, flow_run.run_count or 1

    def say(message: str) -> None:
        logger.info("attempt %s: %s", attempt, message)

    def let_go(previous: Holder) -> None:
        gone = take_over(
            pool, previous.gpu, previous.lease, previous.run, previous.attempt, run_id, run_count
        )
        if gone is not None:
            queue = isinstance(pool, SlurmQueue)
            holder = "the holder of its place in Slurm's queue" if queue else f"GPU {previous.gpu}'s holder"
            say(f"{beam.label}: {holder} is gone ({gone}); its lease is released")

    @contextmanager
    def take_gpu(*, only: Sequence[int] | None = None, skip: SkipReason | None = None) -> Iterator[Holder]:
        notice = WaitNotice(pool, beam.label, say)
        try:
            with gpu_lease(pool, lease_holder, only, skip, who) as lease:
                notice.got(lease.index)
                yield Holder(
                    run=run_id or "",
                    attempt=run_count,
                    gpu=lease.index,
                    lease=str(lease.lease_id),
                    beam=beam.label,
                )
        finally:
            notice.done.set()

    log_batch = every(
        PROGRESS_LOG_SECONDS, lambda batch: logger.info("%s: engine batch %s of %s", beam.label, *batch)
    )

    def on_line(line: str) -> None:
        logger.debug("[engine %s] %s", beam.label, line)
        batch = progress_of(line)
        if batch is not None:
            done, total = batch
            move_bar(done / total)
            log_batch(batch)

    result, completed = simulate_beam(
        settings, backend, beam, attempt, take_gpu, on_line, say, let_go, pending.seen
    )
    if not completed:
        logger.warning("%s: engine exited 0 without a completion line; dose file verified", beam.label)
    show_progress(100.0)
    return result


class PendingBar:
    """The progress bar's text while the beam's job waits in a scheduler's queue (its bar at 0),
    from each probe of the job: `beam 2 (...): Slurm job 123 pending: Resources (40 s)`, at most
    every PROGRESS_SECONDS; the engine-progress text again once the job runs."""

    def __init__(
        self,
        label: str,
        engine_text: str,
        waiting: Callable[[Job], str | None],
        show: Callable[[str], None],
    ) -> None:
        self.label, self.engine_text, self.waiting, self.show = label, engine_text, waiting, show
        self.since: dict[str, float] = {}  # job id -> since when it waits (submitted, else first seen)
        self.shown, self.at = engine_text, 0.0

    def seen(self, job: Job) -> None:
        why = self.waiting(job)
        text = self.engine_text
        if why is not None and job.queued is not None:
            since = self.since.setdefault(job.queued.job_id, job.queued.since or time.time())
            text = f"{self.label}: {why} ({time.time() - since:.0f} s)"
        now = time.monotonic()
        if text != self.shown and (
            why is None or self.shown == self.engine_text or now - self.at >= PROGRESS_SECONDS
        ):
            self.shown, self.at = text, now
            self.show(text)


class WaitNotice:
    """While a beam takes a GPU (or a place in a capped Slurm queue): if none came within
    WAITING_SAY_SECONDS, say for whom it waits (read from the server's lease table), and once it
    has one, which one after how long."""

    def __init__(self, pool: GpuPool, label: str, say: Callable[[str], None]) -> None:
        self.pool, self.label, self.say = pool, label, say
        self.queue = isinstance(pool, SlurmQueue)
        self.started = time.monotonic()
        self.done = threading.Event()
        self.said = False
        threading.Thread(target=contextvars.copy_context().run, args=(self._tell,), daemon=True).start()

    def _tell(self) -> None:
        if self.done.wait(WAITING_SAY_SECONDS):
            return
        try:
            busy = places_text(self.pool) if self.queue else leased_text(gpu_status(self.pool))
        except Exception as error:  # the wait itself must not fail for a message
            busy = f"lease table unreadable: {error}"
        if not self.done.is_set():
            self.said = True
            self.say(f"{self.label}: waiting for {self._what('a')} ({busy})")

    def _what(self, article: str, index: int | None = None) -> str:
        return (
            f"{article} place in Slurm's queue"
            if self.queue
            else f"GPU {index}"
            if index is not None
            else "a GPU"
        )

    def got(self, index: int) -> None:
        self.done.set()
        if self.said:
            waited = time.monotonic() - self.started
            self.say(f"{self.label}: got {self._what('a', index)} after {waited:.0f} s")
