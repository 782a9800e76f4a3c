"""The bad-input corpus (tests/bad_cases.py): each kind alone, fast; then all of them at once
through the service (sensor + worker), next to good cases that must not notice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
)
from prefect.client.schemas.objects import FlowRun, StateType

from config import load_settings
from deployments.processes import stop_tree
from tasks.casefolder import discover_case
from tasks.scanfolder.folders import shown
from tests.bad_cases import (
    BAD_CASES,
    FLOW_CASES,
    INJECTED,
    SENSOR_CASES,
    BadCase,
    observe_as_configured,
    outside,
)
from tests.case_edits import tree_state
from tests.conftest import write_config
from tests.service_stack import (
    FAST,
    REPO_ROOT,
    Stack,
    events,
    running_stack,
    small_case,
    wait_for,
    without_privileges,
)

GOOD = ("GOOD-1", "GOOD-2")
SENSOR_REPORT_SECONDS = 1  # how long a waiting case waits before the sensor reports it


def test_the_corpus_covers_the_issue() -> None:
    assert len(BAD_CASES) >= 22
    assert (
        len({case.kind for case in BAD_CASES}) == len({case.case_id for case in BAD_CASES}) == len(BAD_CASES)
    )
    for case in BAD_CASES:
        assert (case.state is not None) == (case.level == "flow") and (case.event is None) == (
            case.level == "flow"
        )
        assert case.expect or case.state == "Completed", case.kind


@pytest.mark.parametrize("case", BAD_CASES, ids=[case.kind for case in BAD_CASES])
def test_each_kind_alone(case: BadCase, tmp_path: Path) -> None:
    """Discovery (flow level) or the sensor's watcher (sensor level) says what the table expects."""
    config = write_config(tmp_path, {"sensor": {"incomplete_report_seconds": SENSOR_REPORT_SECONDS}})
    scan = load_settings(config, env={}).scan_dir
    case_dir = case.make(scan)
    before = tree_state(scan.parent)
    message = observe_as_configured(case, case_dir, config)
    if case.state == "Completed":
        assert message == ""
        assert discover_case(case_dir).case_id == case.case_id
    else:
        missing = [part for part in case.expect if part not in message]
        assert not missing, f"{case.kind}: {missing} not in:\n{message}"
    if case.level == "flow" and message:  # every problem names the case it belongs to
        assert all(line.startswith(f"{case.case_id}: ") for line in message.splitlines()), message
    if case.grow is None:
        assert tree_state(scan.parent) == before


# -- all at once, through the service -----------------------------------------------------


@pytest.fixture(scope="module")
def stack(prefect_server, tmp_path_factory) -> Iterator[Stack]:
    yield from running_stack(tmp_path_factory, without_privileges())


def _runs_since(start: datetime) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["process-case"])),
            flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=start)),
        )


def _finished(start: datetime, count: int) -> list[FlowRun] | None:
    runs = _runs_since(start)
    done = len(runs) >= count and all(run.state is not None and run.state.is_final() for run in runs)
    return runs if done else None


def _sensor_resource(case: BadCase, case_dir: Path, scan: Path) -> str:
    return f"mqi.case.{shown(case_dir.relative_to(scan))}"


def _injected(folders: list[Path]) -> list[Path]:
    """Files a hostile name's `touch INJECTED-...` would have made, had a shell run it."""
    return [path for folder in folders for path in folder.rglob(f"{INJECTED}-*")]


def _grow_until(stop: threading.Event, folders: dict[BadCase, Path]) -> None:
    while not stop.wait(0.2):
        for case, case_dir in folders.items():
            if case.grow is not None:
                case.grow(case_dir)


@pytest.mark.integration
def test_a_burst_of_bad_cases_fails_each_alone_and_touches_nothing(stack: Stack, tmp_path: Path) -> None:
    # Growth is seen only if the grower never stalls for settle_seconds: 2 s leaves room on a busy machine.
    sensor_settings = {**FAST["sensor"], "incomplete_report_seconds": 1, "settle_seconds": 2}
    config = write_config(tmp_path, {**FAST, "sensor": sensor_settings})
    settings = load_settings(config, env={})
    scan = settings.scan_dir
    folders = {case: case.make(scan) for case in BAD_CASES}
    for case_id in GOOD:
        small_case(scan, case_id)
    growing = {folders[case].relative_to(scan).as_posix() for case in BAD_CASES if case.grow}
    watched = [scan, outside(scan)]

    def state() -> list[dict]:
        trees = [tree_state(folder) for folder in watched]
        for name in growing:  # the one folder this test keeps writing to
            trees[0] = {path: entry for path, entry in trees[0].items() if not path.startswith(f"./{name}")}
        return trees

    before = state()
    stop = threading.Event()
    grower = threading.Thread(target=_grow_until, args=(stop, folders), daemon=True)
    grower.start()
    start = datetime.now(UTC)
    sensor = stack.start_sensor(config)
    try:
        expected = {case.case_id for case in FLOW_CASES} | set(GOOD)
        runs = wait_for("a finished run per flow-level case", lambda: _finished(start, len(expected)), 300)
        for case in SENSOR_CASES:
            resource = _sensor_resource(case, folders[case], scan)
            wait_for(f"the sensor's report of {case.kind}", lambda: events(case.event, resource))  # noqa: B023
        after_reports = _runs_since(start)
    finally:
        stop_tree(sensor.pid)  # before the growth stops: that case would then run
        sensor.wait()
        stop.set()
        grower.join()

    assert sorted(run.name for run in after_reports) == sorted(expected)  # no sensor-level case started
    by_name = {run.name: run for run in runs}
    for case in FLOW_CASES:
        run = by_name[case.case_id]
        assert run.state is not None and run.state.name == case.state, (case.kind, run.state)
        if case.state == "Failed":
            message = run.state.message or ""
            missing = [part for part in (case.case_id, *case.expect) if part not in message]
            assert not missing, f"{case.kind}: {missing} not in the Failed message:\n{message}"
    for case_id in [*GOOD, *(case.case_id for case in FLOW_CASES if case.state == "Completed")]:
        assert by_name[case_id].state_type == StateType.COMPLETED, by_name[case_id].state
        assert len(list(settings.output_dir(case_id).glob("RTDOSE_*.dcm"))) == 2, case_id
    for case in SENSOR_CASES:
        [report] = events(case.event, _sensor_resource(case, folders[case], scan))
        message = report.payload["message"]
        name = shown(folders[case].relative_to(scan))
        assert all(part in message for part in (name, *case.expect)), (case.kind, message)
    assert state() == before
    assert _injected([tmp_path, stack.root]) == [] and not list(REPO_ROOT.glob(f"{INJECTED}-*"))
    assert not list(Path(os.getcwd()).glob(f"{INJECTED}-*"))
