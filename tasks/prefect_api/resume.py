"""Whether a crashed case run is run again, and running it again.

A case run ends Crashed when the process running it died: its worker machine was lost
(the heartbeat automation marks it, deployments/cluster.py), the service stopped under
it, or its worker was killed. Such a run is set AwaitingRetry, so that any worker of the
pool runs it again: finished beams are reused (tasks/prefect_api/reuse.py) and engine
jobs still running are adopted, not started again (tasks/backends/adopt.py). A run that
keeps crashing is resumed at most MAX_RESUMES times, then left Crashed for a person.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.states import AwaitingRetry

MAX_RESUMES = 3
RESUMED = "resumed: the run had crashed"  # how a resume's state message starts


def resumes(history: Sequence[State]) -> int:
    """How often a run was resumed, from its state history."""
    return sum(1 for state in history if (state.message or "").startswith(RESUMED))


def why_not_resume(run: FlowRun, history: Sequence[State], max_resumes: int = MAX_RESUMES) -> str | None:
    """None if `run` should be run again now; else why not (the one place this is decided)."""
    if run.state is None or run.state.type != StateType.CRASHED:
        return f"it is {run.state.name if run.state else 'without a state'}, not Crashed"
    if run.deployment_id is None:
        return "it was not started from a deployment (`mqi run`): no worker can run it again"
    done = resumes(history)
    if done >= max_resumes:
        return f"it crashed again after {done} resumes; left Crashed (Retry in the UI runs it again)"
    return None


def resume_if_crashed(client: SyncPrefectClient, run: FlowRun, by: str) -> str | None:
    """Run `run` again on any worker if it should be; None if it was, else why not."""
    history = client.read_flow_run_states(run.id)
    reason = why_not_resume(run, history)
    if reason is None:
        count = resumes(history) + 1
        client.set_flow_run_state(
            run.id, AwaitingRetry(message=f"{RESUMED} (resume {count} of at most {MAX_RESUMES}, by {by})")
        )
    return reason
