"""Runs stranded by a process that is gone: marked Crashed, so that the sensor resumes them.

A flow-run process that dies without reporting (SIGKILLed, its worker killed, the server
away when it ended) leaves its run Running on the server for ever: the run holds one of
the case queue's places, its case waits for it (one run of a case at a time), and the
sensor never resumes it. `mqi up` knows the processes its worker started; a run whose
process it saw and that has since gone is marked Crashed within one reconcile interval.
Only runs whose process this machine saw are touched: another machine's runs are its own
service's business (and Prefect's heartbeats', where they are on).

A run that a worker took (Pending) and never started has no process to look at: the
server's automation marks it Crashed after SILENCE_SECONDS (deployments/cluster.py). But
after a server restart Prefect's triggers hold every event that follows one from before
the restart for up to 15 minutes (causal ordering, PRECEDING_EVENT_LOOKBACK; the events it
has seen are kept in memory), so the `mqi up` that runs the file sensor also marks such
runs Crashed itself, within SILENCE_SECONDS plus one reconcile interval.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelled, Crashed

from deployments.processes import process_alive

UNFINISHED = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


def stranded(runs: list[FlowRun], seen: set[int]) -> list[FlowRun]:
    """The runs among `runs` whose process was one of `seen` and is no longer alive."""
    found = []
    for run in runs:
        pid = run.infrastructure_pid
        if pid is not None and pid.isdigit() and int(pid) in seen and not process_alive(int(pid)):
            found.append(run)
    return found


def crash_stranded(client: SyncPrefectClient, seen: set[int]) -> list[FlowRun]:
    """Mark Crashed (Cancelled, if it was being cancelled) every unfinished run whose process
    (one of `seen`) is gone; return them."""
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)))
    )
    found = stranded(runs, seen)
    for run in found:
        gone = f"its process (pid {run.infrastructure_pid}) ended without reporting"
        if run.state_type == StateType.CANCELLING:  # it was being cancelled: it is
            state = Cancelled(message=f"{gone}; marked Cancelled by mqi up")
        else:
            state = Crashed(message=f"{gone}; marked Crashed by mqi up, so that the file sensor resumes it")
        client.set_flow_run_state(run.id, state, force=True)
        run.state = state
    return found


def crash_never_started(client: SyncPrefectClient, seconds: float) -> list[FlowRun]:
    """Mark Crashed every run that has been Pending (taken by a worker, not started) for longer
    than `seconds`: its worker is gone or stuck. Return them."""
    pending = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING]))
    cutoff = datetime.now(UTC) - timedelta(seconds=seconds)
    found = []
    for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(state=pending)):
        if run.state is None or run.state.timestamp > cutoff:
            continue
        now = client.read_flow_run(run.id).state  # still that Pending state, not started meanwhile
        if now is None or now.id != run.state.id:
            continue
        state = Crashed(
            message=f"taken by a worker but not started for {seconds:g} s: its worker is gone; "
            "marked Crashed by mqi up, so that the file sensor resumes it"
        )
        client.set_flow_run_state(run.id, state, force=True)
        run.state = state
        found.append(run)
    return found
