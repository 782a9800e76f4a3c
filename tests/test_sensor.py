"""The file sensor end to end: a process worker runs the repository's deployments.

Each sensor runs as a subprocess with a config of its own (its own scan folder), which it
passes on to the case runs it starts.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Completed, Crashed, Running, StateType

from config import load_settings
from flows.sensor import start_case_run
from tasks.scanfolder.contents import case_key, list_files
from tests.conftest import DATABASES, on_database, write_config
from tests.invariants import check_invariants, watch
from tests.service_stack import FAST, Stack, case_runs, events, finished, running_stack, small_case, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory) -> Iterator[Stack]:
    """On SQLite, or on PostgreSQL for the tests parametrised so (`indirect`)."""
    with on_database(request, getattr(request, "param", "sqlite")):
        yield from running_stack(tmp_path_factory)


def sensor_config(tmp_path: Path) -> tuple[Path, Path]:
    config = write_config(tmp_path, FAST)
    return config, load_settings(config, env={}).scan_dir


@pytest.mark.parametrize("stack", DATABASES, indirect=True)
def test_burst_with_duplicate_events_and_a_sensor_restart_runs_every_case_once(stack, tmp_path):
    config, scan = sensor_config(tmp_path)
    ids = [f"BURST-{n:02d}" for n in range(20)]
    first = stack.start_sensor(config)
    for n, case_id in enumerate(ids[:10]):
        room = ("G1", "G2")[n % 2]
        case = small_case(scan / room, case_id, machine=room)
        if n % 3 == 0:  # the transfer service writes the marker again, and a temporary file comes and goes
            (case / "_CASE_READY").touch()
            (case / "copy.tmp").write_bytes(b"x")
            (case / "copy.tmp").unlink()
    wait_for("the first sensor to start some runs", lambda: len(case_runs(ids)) >= 3)
    first.send_signal(signal.SIGKILL)  # no goodbye: as if the host lost power
    first.wait()
    for case_id in ids[10:15]:  # arrive while no sensor runs
        small_case(scan, case_id)
    stack.start_sensor(config)
    for n, case_id in enumerate(ids[15:]):
        case = small_case(scan, case_id)
        if n % 2 == 0:
            os.utime(case / "_CASE_READY")
    runs = wait_for("one finished run per case", lambda: finished(ids), timeout=300)
    assert sorted(run.name for run in runs) == ids
    assert [run.name for run in runs if run.state_type != StateType.COMPLETED] == []
    assert all("trigger:sensor" in run.tags for run in runs)
    rooms = {run.name: [tag for tag in run.tags if tag.startswith("room:")] for run in runs}
    assert rooms["BURST-00"] == ["room:G1"] and rooms["BURST-01"] == rooms["BURST-19"] == ["room:G2"]
    assert len(case_runs(ids)) == 20


def test_case_missing_a_delivery_folder_is_reported_not_run_and_runs_once_complete(stack, tmp_path):
    config, scan = sensor_config(tmp_path)
    case = small_case(scan, "HALF-1", beams=2)
    delivery = sorted(p for p in case.iterdir() if p.is_dir())[-1]
    held = Path(shutil.move(delivery, tmp_path / delivery.name))
    bad = scan / "BAD-1"  # ready, but its plan is not DICOM: the sensor runs it, discovery fails it
    bad.mkdir()
    (bad / "RP.1.dcm").write_bytes(b"not dicom")
    (bad / "_CASE_READY").touch()
    stack.start_sensor(config)
    [report] = wait_for("the incomplete report", lambda: events("mqi.case.incomplete", "mqi.case.HALF-1"))
    assert report.payload["missing_beams"] == [3]
    assert case_runs(["HALF-1"]) == []
    shutil.move(held, delivery)
    [run] = wait_for("the run once complete", lambda: finished(["HALF-1"]))
    assert run.state_type == StateType.COMPLETED, run.state.message
    assert run.state.message == "HALF-1: 2/2 beams done"
    [failed] = wait_for("the bad folder's run", lambda: finished(["BAD-1"]))
    assert failed.state_type == StateType.FAILED and "BAD-1: not run: RP.1.dcm: " in failed.state.message


def test_changed_folder_runs_again_and_an_unchanged_one_does_not(stack, tmp_path):
    config, scan = sensor_config(tmp_path)
    stack.start_sensor(config)
    case = small_case(scan, "CHANGE-1")
    wait_for("the first run", lambda: finished(["CHANGE-1"]))
    (case / "_CASE_READY").touch()  # an event without new content
    small_case(scan, "CHANGE-2")  # the sensor has looked at CHANGE-1 again once CHANGE-2 has a run
    wait_for("the second case's run", lambda: case_runs(["CHANGE-2"]))
    assert len(case_runs(["CHANGE-1"])) == 1
    ptn = next(case.glob("*/L001.ptn"))
    ptn.write_bytes(ptn.read_bytes()[::-1])  # rewritten in place: found by the periodic full rescan
    runs = wait_for("a run of the changed folder", lambda: finished(["CHANGE-1"], count=2))
    assert [run.state_type for run in runs] == [StateType.COMPLETED] * 2
    detected = events("mqi.case.detected", "mqi.case.CHANGE-1")
    assert len({event.payload["key"] for event in detected}) == 2


@pytest.mark.parametrize("stack", DATABASES, indirect=True)
def test_a_crashed_run_is_resumed_when_the_sensor_starts_again(stack, tmp_path):
    config, scan = sensor_config(tmp_path)
    first = stack.start_sensor(config)
    small_case(scan, "RESUME-1")
    [run] = wait_for("the first run", lambda: finished(["RESUME-1"]))
    first.send_signal(signal.SIGKILL)
    first.wait()
    with get_client(sync_client=True) as client:  # as when `mqi up` stopped under the run
        client.set_flow_run_state(run.id, Crashed(message="stopped under the run"), force=True)
    stack.start_sensor(config)

    def rerun_finished() -> list | None:
        runs = finished(["RESUME-1"])
        return runs if runs and runs[0].run_count == 2 else None

    [resumed] = wait_for("the crashed run to be resumed", rerun_finished)
    assert resumed.id == run.id and resumed.state_type == StateType.COMPLETED, resumed.state.message


def _reported_waiting(case: Path, stage: str) -> list:
    """The sensor's incomplete reports of the folder's current content (its key), with `stage` in the text."""
    key = case_key(case.name, list_files(case), "_CASE_READY")
    reports = events("mqi.case.incomplete", f"mqi.case.{case.name}")
    return [
        report for report in reports if report.payload["key"] == key and stage in report.payload["message"]
    ]


def test_a_marker_written_before_its_files_gives_exactly_one_run(stack, tmp_path):
    """Issue 16: the marker first, then the files with pauses: once 24 runs, 19 failed at discovery."""
    config, scan = sensor_config(tmp_path)
    settings = load_settings(config, env={})
    source = small_case(tmp_path / "source", "EARLY-1", beams=2)
    first, second = sorted(folder for folder in source.iterdir() if folder.is_dir())
    case = scan / "EARLY-1"
    case.mkdir(parents=True)
    (case / "_CASE_READY").touch()
    bad = scan / "EARLY-BAD"  # its plan cannot be read: not arriving but broken, so it runs and fails
    bad.mkdir()
    (bad / "RP.1.dcm").write_bytes(b"not dicom")
    (bad / "_CASE_READY").touch()
    stack.start_sensor(config)

    def copy(*paths: Path) -> None:
        for path in paths:
            target = case / path.relative_to(source)
            target.parent.mkdir(exist_ok=True)
            shutil.copy2(path, target)

    # Each stage is held until the sensor has reported that very content as incomplete.
    stages = [
        ((), "the case folder is empty"),
        (sorted(first.glob("*.ptn")), f"delivery folder '{first.name}' has machine logs but no PlanInfo.txt"),
        ([first / "PlanInfo.txt"], f"delivery folder '{first.name}' has no PlanRange.txt yet"),
        ([first / "PlanRange.txt", *sorted(first.glob("*.mgn"))], "it has no RTPLAN yet"),
        (list(source.glob("RP.*.dcm")), "treatment beam(s) 3 have no delivery folder"),
    ]
    for paths, stage in stages:
        copy(*paths)
        wait_for(
            f"the report of {stage!r} (or a run)",
            lambda: _reported_waiting(case, stage) or case_runs(["EARLY-1"]),  # noqa: B023
        )
        assert case_runs(["EARLY-1"]) == [], stage
    copy(*sorted(path for path in second.iterdir()))
    watched = watch(case)
    [run] = wait_for("the case's run", lambda: finished(["EARLY-1"]))
    check_invariants(
        settings, stack.launch_log, watched, state=StateType.COMPLETED, launches={2: 1, 3: 1}, done=(2, 3)
    )
    assert len(case_runs(["EARLY-1"])) == 1
    [failed] = wait_for("the broken folder's run", lambda: finished(["EARLY-BAD"]))
    assert failed.state_type == StateType.FAILED and "EARLY-BAD: not run: RP.1.dcm: " in failed.state.message
    assert len(case_runs(["EARLY-BAD"])) == 1  # seen again at every full rescan: same content, no new run


def test_new_content_of_a_case_with_an_active_run_waits_for_that_run_to_end(stack, tmp_path):
    config, scan = sensor_config(tmp_path)
    case_dir = scan / "DEFER-1"
    with get_client(sync_client=True) as client:  # a run of the case still going (an older content's)
        deployment = client.read_deployment_by_name("process-case/case")
        active = client.create_flow_run_from_deployment(
            deployment.id, parameters={"case_dir": str(case_dir)}, name="DEFER-1", state=Running()
        )
    stack.start_sensor(config)
    small_case(scan, "DEFER-1")
    sensor_log = stack.root / "sensor.log"
    wait_for(
        "the sensor to defer the case", lambda: "DEFER-1 changed while its run" in sensor_log.read_text()
    )
    assert [run.id for run in case_runs(["DEFER-1"])] == [active.id]
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(active.id, Completed(message="the older content's run ended"), force=True)
    runs = wait_for("the new content's run", lambda: finished(["DEFER-1"], count=2))
    [new] = [run for run in runs if run.id != active.id]
    assert new.state_type == StateType.COMPLETED, new.state.message


def test_a_case_run_made_by_another_sensor_first_is_known_as_theirs(stack, tmp_path):
    """Two sensors that both found a case ready create its run with one key: only the first made it."""
    settings = load_settings(sensor_config(tmp_path)[0], env={})
    case = small_case(settings.scan_dir, "TWICE-0")
    first, made = start_case_run(settings, case, trigger="sensor", room=None, key="twice-0-key")
    again, made_again = start_case_run(settings, case, trigger="sensor", room=None, key="twice-0-key")
    assert (first.id, made, made_again) == (again.id, True, False)
    wait_for("its run to end", lambda: finished(["TWICE-0"]))


def test_two_sensors_on_one_server_announce_a_case_once(stack, tmp_path):
    config, scan = sensor_config(tmp_path)
    stack.start_sensor(config)
    stack.start_sensor(config)  # a second service's sensor, watching the same folder
    small_case(scan, "TWICE-1")
    [run] = wait_for("the case's one run", lambda: finished(["TWICE-1"]), timeout=180)
    assert run.state_type == StateType.COMPLETED, run.state
    assert len(events("mqi.case.detected", "mqi.case.TWICE-1")) == 1
    started = [
        line for line in (stack.root / "sensor.log").read_text().splitlines() if "TWICE-1 ready" in line
    ]
    assert len(started) == 1, started
