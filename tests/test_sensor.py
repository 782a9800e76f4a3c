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
from prefect.states import Crashed, StateType

from config import load_settings
from tests.conftest import write_config
from tests.service_stack import FAST, Stack, case_runs, events, finished, running_stack, small_case, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def stack(prefect_server, tmp_path_factory) -> Iterator[Stack]:
    yield from running_stack(tmp_path_factory)


def sensor_config(tmp_path: Path) -> tuple[Path, Path]:
    config = write_config(tmp_path, FAST)
    return config, load_settings(config, env={}).scan_dir


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
    assert run.state.message == "case HALF-1: 2/2 beams done"
    [failed] = wait_for("the bad folder's run", lambda: finished(["BAD-1"]))
    assert failed.state_type == StateType.FAILED and "BAD-1: RP.1.dcm: " in failed.state.message


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
