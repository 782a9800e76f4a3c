"""Which run of a case goes first (tasks/prefect_api/case_turn.py), without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from prefect.client.schemas.objects import FlowRun

from tasks.prefect_api.case_turn import runs_ahead

T0 = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def run(started: datetime | None, run_id: UUID | None = None) -> FlowRun:
    return FlowRun(id=run_id or uuid4(), flow_id=uuid4(), name="P1", start_time=started)


def test_the_run_that_started_first_goes_first_and_of_two_exactly_one_waits():
    early, late = run(T0), run(T0 + timedelta(seconds=1))
    assert runs_ahead(late, [early, late]) == [early]
    assert runs_ahead(early, [early, late]) == []


def test_runs_that_started_at_the_same_moment_are_ordered_by_id():
    low, high = run(T0, UUID(int=1)), run(T0, UUID(int=2))
    assert runs_ahead(high, [low, high]) == [low]
    assert runs_ahead(low, [low, high]) == []


def test_a_run_not_started_yet_waits_for_started_ones_and_never_holds_them_up():
    started, pending = run(T0), run(None)
    assert runs_ahead(pending, [started, pending]) == [started]
    assert runs_ahead(started, [started, pending]) == []
