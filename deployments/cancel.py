"""Cancel means stop: a cancelled case run's engine jobs are stopped and their GPUs released.

Engine jobs run detached from the case run (so that a crashed run's engines are adopted,
not started twice), so stopping the run's process does not stop them. Three ways lead here:

- the warm worker, when a run it runs is cancelled (UI, API, `mqi cancel CASE`): it stops
  the run's process, then its jobs (`stop_run_jobs`), and ends the run Cancelled with a
  message saying what was stopped;
- the reconciler in `mqi up` (`Reconciler`), every RECONCILE_SECONDS: a run whose process
  was SIGKILLed cannot run hooks (cancelled by Prefect's own worker, or while the warm
  worker was down), so it finds case runs that are over and whose jobs must stop
  (`jobs_must_stop`) and does the same;
- `mqi cancel CASE` (`cancel_case`), which asks for the cancellation as the UI does.

A job is stopped only if its holder record (tasks/backends/base.py: Holder) names that run:
a job a newer run adopted is never touched. Stopped jobs are marked cancelled in their job
folders, so a later run of the case launches them again instead of adopting them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.logging import get_logger
from prefect.states import Cancelled, Cancelling

from config import load_settings
from config.settings import Settings
from deployments.server import ServiceError, connected, ui_url
from tasks.backends import JobState, make_backend
from tasks.gpu.pool import holder_pool
from tasks.gpu.takeover import release_lease
from tasks.prefect_api.secrets import secret_value

logger = get_logger("mqi.cancel")

CANCEL_WAIT_SECONDS = 60.0  # `mqi cancel` waits this long for the runs to end
RECONCILE_SECONDS = 10.0  # how often `mqi up` looks for over runs whose jobs still run
ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
# Not Cancelling: its worker is stopping it, and a run process still alive would launch a stopped job again.
OVER = [StateType.CANCELLED, StateType.CRASHED]


def jobs_must_stop(run: FlowRun, newest_of_case: FlowRun | None) -> str | None:
    """Why the engine jobs a case run holds must be stopped, or None: the reconciler's one decision.

    Cancelled: stop. Crashed: its jobs are adopted when it is resumed
    (the sensor's next start, Retry, `mqi rerun`), so they keep running, unless a newer run
    of the case has replaced it (it will not be resumed; a newer run with the same inputs
    adopted the jobs already, and those are not the crashed run's any more).
    """
    state = run.state.type if run.state is not None else None
    if state == StateType.CANCELLED:
        return f"case run {run.name} was cancelled"
    if state == StateType.CRASHED and newest_of_case is not None and newest_of_case.id != run.id:
        return f"case run {run.name} crashed and was replaced by run {newest_of_case.name}"
    return None


@dataclass(frozen=True)
class Stopped:
    beam: str
    gpu: int
    where: str


def run_settings(run: FlowRun, default: Settings) -> Settings:
    """The settings a case run ran with: its `config` parameter, else the service's."""
    config = run.parameters.get("config")
    return load_settings(config) if config else default


def stop_run_jobs(settings: Settings, run: FlowRun, reason: str) -> list[Stopped]:
    """Stop the running engine jobs whose holder is `run`, mark them cancelled, release their GPUs."""
    case_id = Path(str(run.parameters["case_dir"])).name
    backend = make_backend(settings, secrets=secret_value)
    pool = holder_pool(settings)  # what the holders hold: GPUs, or places in a capped Slurm queue
    stopped: list[Stopped] = []
    for job in backend.jobs_of_case(case_id):
        if job.state is not JobState.RUNNING or job.engine_ended:
            continue
        holder = backend.holder(job)
        if holder is None or holder.run != str(run.id):
            continue
        if backend.stop(job, reason):
            beam = holder.beam or job.dir
            release_lease(pool, holder.gpu, holder.lease, f"{beam}: {reason}")
            stopped.append(Stopped(beam=beam, gpu=holder.gpu, where=job.host or backend.where))
    return stopped


def stopped_text(stopped: list[Stopped]) -> str:
    """`stopped the engine of beam 2 (1G000:TX) on GPU 0 of hpc1 and released its GPU`, or that none ran."""
    if not stopped:
        return "no engine was running"
    jobs = ", ".join(f"{job.beam} on GPU {job.gpu} of {job.where}" for job in stopped)
    noun, gpus = ("engine", "its GPU") if len(stopped) == 1 else ("engines", "their GPUs")
    return f"stopped the {noun} of {jobs} and released {gpus}"


def cancelled_message(settings: Settings, run: FlowRun) -> str:
    """Stop a cancelled case run's jobs; the run's final message says what was stopped."""
    reason = f"case run {run.name} was cancelled"
    try:
        return stopped_text(stop_run_jobs(settings, run, reason))
    except Exception as error:  # the run still ends Cancelled; the reconciler tries again
        logger.warning("stopping the engine jobs of %s failed: %s", run.name, error)
        return f"stopping its engine jobs failed ({error}); the service tries again"


class Reconciler:
    """In `mqi up`: every RECONCILE_SECONDS, stop the jobs of case runs that are over (jobs_must_stop).

    Only runs whose state changed within the engine's timeout are looked at (an older job
    has been killed by its own timeout), and each run state once.
    """

    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.done: set[tuple[str, str]] = set()  # (run id, state id) already handled
        self.next = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.next

    def reconcile(self, client: SyncPrefectClient) -> None:
        self.next = time.monotonic() + RECONCILE_SECONDS
        since = datetime.now(UTC) - timedelta(seconds=self.settings.engine.timeout_seconds + 60)
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[self.settings.case_flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=OVER))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=200,
        )
        for run in runs:
            if run.state is None or run.state.timestamp < since or "case_dir" not in run.parameters:
                continue
            key = (str(run.id), str(run.state.id))
            if key in self.done:
                continue
            reason = jobs_must_stop(run, newest_run(client, self.settings, run.name))
            try:
                stopped = stop_run_jobs(run_settings(run, self.settings), run, reason) if reason else []
            except Exception as error:  # e.g. the GPU host is unreachable: next time
                self.say(f"warning: could not stop the engine jobs of case run {run.name}: {error}")
                continue
            self.done.add(key)
            if stopped:
                self.say(f"{reason}: {stopped_text(stopped)}")


def newest_run(client: SyncPrefectClient, settings: Settings, name: str) -> FlowRun | None:
    """The newest run of the case named `name`."""
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[settings.case_flow_name])),
        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=1,
    )
    return runs[0] if runs else None


def cancel_case(client: SyncPrefectClient, settings: Settings, case: str) -> list[FlowRun]:
    """Cancel the active runs of case `case` (its folder name), as the UI's Cancel does; return them.

    A running run becomes Cancelling (its worker stops it and its jobs); one not yet
    running (Scheduled, Pending in the queue) is Cancelled at once.
    """
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[settings.case_flow_name])),
        flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[case]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE)),
        ),
    )
    for run in runs:
        if run.state_type == StateType.RUNNING:
            client.set_flow_run_state(run.id, Cancelling(message="cancelled with mqi cancel"))
        else:
            client.set_flow_run_state(run.id, Cancelled(message="cancelled with mqi cancel before it ran"))
    return runs


def print_cancel(settings: Settings, api: str, case: str, wait_seconds: float = CANCEL_WAIT_SECONDS) -> int:
    """`mqi cancel CASE`: cancel its active runs, wait for them to end, print how each ended."""
    try:
        with connected(api) as client:
            runs = cancel_case(client, settings, case)
            if not runs:
                print(f"case {case}: no active run to cancel", file=sys.stderr)
                return 1
            for run in runs:
                print(f"cancelling run {run.name} ({run.state_name}): {ui_url(api)}/runs/flow-run/{run.id}")
            deadline = time.monotonic() + wait_seconds
            ended = [client.read_flow_run(run.id) for run in runs]
            while not all(run.state is not None and run.state.is_final() for run in ended):
                if time.monotonic() > deadline:
                    print(f"not ended after {wait_seconds:g} s; is the service up?", file=sys.stderr)
                    return 1
                time.sleep(0.5)
                ended = [client.read_flow_run(run.id) for run in runs]
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for run in ended:
        assert run.state is not None
        print(f"{run.name}: {run.state.name}: {run.state.message}")
    return 0
