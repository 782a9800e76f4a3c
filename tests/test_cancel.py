"""Which over case runs have their engine jobs stopped (deployments/cancel.py); the system tests are in
tests/test_case_runs.py."""

from __future__ import annotations

from uuid import uuid4

from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelled, Crashed, Running, State

from deployments.cancel import jobs_must_stop


def test_only_cancelled_or_replaced_runs_have_their_jobs_stopped():
    def run(name: str, state: State) -> FlowRun:
        return FlowRun(flow_id=uuid4(), name=name, state=state)

    cancelled, crashed, newer = run("P1", Cancelled()), run("P1", Crashed()), run("P1", Running())
    assert jobs_must_stop(cancelled, cancelled) == "case run P1 was cancelled"
    assert jobs_must_stop(crashed, crashed) is None  # resumed later: its jobs are adopted
    assert jobs_must_stop(crashed, newer) == f"case run P1 crashed and was replaced by run {newer.name}"
    assert jobs_must_stop(newer, newer) is None
