"""One run of a case at a time: a case run that finds an earlier active run of its case waits.

Two runs of one case at once (`mqi rerun` while the sensor's run is going, `--force` on a
running case, two sensors) would each adopt or launch the same beams' engine jobs, and
one would collect or overwrite what the other still simulates. So a case run, before it
reads the folder, waits until no run of the same case folder that started before it is
still active; then it reuses what that run simulated (or, with `force`, simulates
again), one engine per beam input at a time. The order is the runs' start times (the
first Running state, kept across a resume), ties broken by run id, so that of two runs
exactly one waits for the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

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

# A run in one of these states may have engine jobs going (Pending and Paused ones too:
# a resumed or paused run goes on where it stopped).
ACTIVE = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED]
TURN_POLL_SECONDS = 2.0


def _same_folder(run: FlowRun, case_dir: Path) -> bool:
    given = run.parameters.get("case_dir")
    return isinstance(given, str) and Path(given).resolve() == case_dir.resolve()


def active_case_runs(client: SyncPrefectClient, flow_name: str, case_dir: Path) -> list[FlowRun]:
    """The active runs of the case in `case_dir` (runs are named after their case folder)."""
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
        flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[case_dir.name]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE)),
        ),
    )
    return [run for run in runs if _same_folder(run, case_dir)]


def _order(run: FlowRun) -> tuple[datetime, str]:
    """Start time then id; a run not started yet comes after every started one."""
    return (run.start_time or datetime.max.replace(tzinfo=UTC), str(run.id))


def runs_ahead(me: FlowRun, active: list[FlowRun]) -> list[FlowRun]:
    """The runs among `active` that go before `me`: started earlier (ties: the smaller id)."""
    return [run for run in active if run.start_time is not None and _order(run) < _order(me)]


def wait_for_turn(
    client: SyncPrefectClient,
    flow_name: str,
    case_dir: Path,
    me: UUID,
    say: Callable[[str], None],
    poll_seconds: float = TURN_POLL_SECONDS,
) -> None:
    """Return once no run of this case that started before run `me` is active; say why it waits."""
    said: set[UUID] = set()
    while True:
        this = client.read_flow_run(me)
        ahead = runs_ahead(this, active_case_runs(client, flow_name, case_dir))
        if not ahead:
            if said:
                say(f"case {case_dir.name}: the earlier run of this case has ended; this run goes on")
            return
        for run in ahead:
            if run.id not in said:
                said.add(run.id)
                state = run.state.name if run.state else "active"
                say(
                    f"case {case_dir.name}: waiting for its run {run.name} ({run.id}, {state}) to end: "
                    "one run of a case at a time, so no beam is simulated twice at once (a run whose "
                    "process is gone is marked Crashed once its heartbeats have stopped for 90 s, on a "
                    "server `mqi up` set up; elsewhere mark it Crashed by hand)"
                )
        time.sleep(poll_seconds)
