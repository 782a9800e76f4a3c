"""`mqi up` under faults: stopped while cases compete for GPUs, its worker SIGKILLed.

Each scenario runs the whole service as an operator does (`mqi up` in its own session),
with the stand-in engine held running (MQI_STANDIN_ENGINE_HOLD) so that the fault lands
while engines run, and ends with the invariants: every case Completed once, each beam's
engine launched once, no GPU slot taken, nothing `mqi up` started left running.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled, Crashed, Pending, Running

from config import Settings, load_settings
from deployments.processes import process_alive
from deployments.server import MONITOR_DEPLOYMENT, deploy, ensure_work_pool, healthy
from deployments.service import MONITOR_PAUSE_SECONDS, PLACE_HELD, Service
from deployments.stranded import crash_never_started
from tests.conftest import write_config
from tests.invariants import check_invariants, engine_launches, watch
from tests.local_server import LocalServer, free_port
from tests.service_stack import (
    FAST,
    Up,
    case_runs,
    engines_alive,
    finished,
    remove_deployments,
    small_case,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]

LEASE_SECONDS = (
    60  # a stopped process's GPU leases expire this long after its last renewal (the least allowed)
)


@pytest.fixture
def service(tmp_path) -> Iterator[tuple[Up, Settings, Path, Path]]:
    """`mqi up` on the session's server with two GPUs and held engines; (up, settings, hold, launch log)."""
    hold, launch_log = tmp_path / "hold", tmp_path / "launches.jsonl"
    config = write_config(
        tmp_path,
        {
            **FAST,
            "backend": {
                **FAST["backend"],
                "host": "up-faults",
                "gpus": [0, 1],
                "gpu_lease_seconds": LEASE_SECONDS,
            },
        },
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "MQI_STANDIN_ENGINE_HOLD": str(hold),
        "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
    }
    up = Up(tmp_path, config, env)
    try:
        yield up, load_settings(config, env={}), hold, launch_log
    finally:
        up.kill()
        remove_deployments()


def simulating(run_id) -> int:
    """How many of a case run's simulate task runs are Running (engine running or waiting for a GPU)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[run_id]),
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])),
            )
        )
    return sum(run.name.startswith("simulate") for run in runs)


def test_mqi_up_stopped_while_two_cases_compete_hands_back_and_resumes_without_a_second_engine(service):
    up, settings, hold, launch_log = service
    hold.touch()
    up.start()
    first = watch(small_case(settings.scan_dir, "STOP-A", beams=2))
    wait_for("both GPUs busy with STOP-A", lambda: engine_launches(launch_log, "STOP-A") == {2: 1, 3: 1})
    second = watch(small_case(settings.scan_dir, "STOP-B", beams=2))
    [waiting] = wait_for("STOP-B's run", lambda: case_runs(["STOP-B"]))
    wait_for("STOP-B's beams to wait for a GPU", lambda: simulating(waiting.id) == 2)
    engines = engines_alive(launch_log)
    assert len(engines) == 2

    assert up.stop(signal.SIGTERM) == 0, up.text()
    assert engine_launches(launch_log, "STOP-B") == {}  # nothing launched on the GPUs the engines hold
    assert up.left_running(keep=engines) == []
    assert engines_alive(launch_log) == engines  # the detached engine jobs go on
    states = {run.name: run.state_type for run in case_runs(["STOP-A", "STOP-B"])}
    assert states == {"STOP-A": StateType.CRASHED, "STOP-B": StateType.CRASHED}, up.text()

    hold.unlink()  # STOP-A's engines end while the service is down
    wait_for("STOP-A's engines to end", lambda: not engines_alive(launch_log), timeout=60)
    up.start()

    def resumed_and_ended() -> bool:  # a Crashed run is final too: wait for the resumed runs' ends
        runs = finished(["STOP-A", "STOP-B"])
        return bool(runs) and all(run.run_count >= 2 for run in runs)

    wait_for("both cases to be resumed and finish", resumed_and_ended, timeout=300)
    assert up.stop(signal.SIGINT) == 0, up.text()
    for case in (first, second):
        run = check_invariants(
            settings, launch_log, case, state=StateType.COMPLETED, launches={2: 1, 3: 1}, done=(2, 3)
        )
        assert run.run_count == 2, f"{case.case_id} was not resumed: {run.run_count} runs"
    assert up.left_running(keep=set()) == []


def test_mqi_up_restarts_a_sigkilled_worker_and_leaves_nothing_of_the_old_one(service):
    up, settings, hold, launch_log = service
    hold.touch()
    up.start()
    case = watch(small_case(settings.scan_dir, "KILLW-1", beams=2))
    wait_for("both engines", lambda: engine_launches(launch_log, "KILLW-1") == {2: 1, 3: 1})
    old = up.look()
    worker = up.process_with(b"warm_worker")
    os.kill(worker, signal.SIGKILL)
    mark = len(up.out.read_bytes())
    wait_for("mqi up to start a new worker", lambda: "the worker exited with code -9" in up.text(mark))
    engines = engines_alive(launch_log)
    wait_for(
        "the old worker's processes to be stopped",
        lambda: not [p for p in old - engines if process_alive(p)],
        timeout=60,
    )
    wait_for("the case run to be resumed", lambda: case_runs(["KILLW-1"])[0].run_count == 2, timeout=120)
    hold.unlink()
    wait_for("the case to finish", lambda: finished(["KILLW-1"]), timeout=300)
    assert up.stop(signal.SIGINT) == 0, up.text()
    check_invariants(
        settings, launch_log, case, state=StateType.COMPLETED, launches={2: 1, 3: 1}, done=(2, 3)
    )
    assert up.left_running(keep=set()) == []
    assert "Traceback" not in up.text(), up.text()


def test_the_server_sigkilled_under_mqi_up_is_started_again_and_the_case_still_completes(tmp_path):
    """`mqi up` with a server of its own (nothing answers at its URL), which is SIGKILLed mid-case."""
    hold, launch_log = tmp_path / "hold", tmp_path / "launches.jsonl"
    config = write_config(
        tmp_path, {**FAST, "backend": {**FAST["backend"], "host": "up-server", "gpus": [0, 1]}}
    )
    settings = load_settings(config, env={})
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "MQI_STANDIN_ENGINE_HOLD": str(hold),
        "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
    }
    up = Up(tmp_path, config, env)
    hold.touch()
    try:
        up.start()
        case = watch(small_case(settings.scan_dir, "KILLS-1", beams=2))
        wait_for("both engines", lambda: engine_launches(launch_log, "KILLS-1") == {2: 1, 3: 1})
        server = up.process_with(b"server\x00start")
        mark = len(up.out.read_bytes())
        os.kill(server, signal.SIGKILL)
        wait_for("a new server", lambda: "the server exited with code -9" in up.text(mark))
        hold.unlink()
        with temporary_settings({PREFECT_API_URL: api}):
            wait_for("the server to answer", lambda: healthy(api), timeout=120)
            wait_for("the case to finish", lambda: finished(["KILLS-1"]), timeout=300)
            check_invariants(
                settings, launch_log, case, state=StateType.COMPLETED, launches={2: 1, 3: 1}, done=(2, 3)
            )
            assert up.stop(signal.SIGINT) == 0, up.text()
    finally:
        up.kill()
    assert "Traceback" not in up.text(), up.text()
    assert up.left_running(keep=set()) == []


def test_mqi_up_waits_out_a_busy_server_at_start_and_comes_up(tmp_path):
    """A server whose SQLite database another writer holds fails every write (503, or no answer
    within the client's timeout): `mqi up` says so once, in a line, and comes up once the server
    answers (it used to end with a traceback)."""
    server = LocalServer(tmp_path / "prefect")  # its own: this test locks its database
    server.home.mkdir()
    server.start()
    config = write_config(tmp_path, {**FAST, "backend": {**FAST["backend"], "host": "busy", "gpus": [0]}})
    quick = {"PREFECT_CLIENT_MAX_RETRIES": "1", "PREFECT_API_REQUEST_TIMEOUT": "5"}  # fail fast, say it
    env = {**os.environ, "PREFECT_API_URL": server.api_url, **quick}
    up = Up(tmp_path, config, env)
    database = sqlite3.connect(server.home / "prefect.db", isolation_level=None)
    try:
        database.execute("BEGIN EXCLUSIVE")  # the server's writes now fail: 503 Service Unavailable
        up.start(ready="setting up the server: the Prefect server is unavailable (")
        database.execute("COMMIT")
        wait_for("mqi up to be up", lambda: "is up" in up.text())
        assert up.stop(signal.SIGINT) == 0, up.text()
    finally:
        database.close()
        up.kill()
        server.stop()
    assert "Traceback" not in up.text(), up.text()
    assert up.text().count("the Prefect server is unavailable") == 1, up.text()


def test_a_gpu_monitor_cancelled_for_another_active_one_watches_it_instead_of_starting_more(tmp_path):
    """The monitor deployment runs one at a time and cancels a new run while another holds its
    place (a second `mqi up`, or a killed worker's run until it is marked Crashed). `mqi up` used
    to start a new monitor at every look, each cancelled at once: 56 runs in 2.5 minutes."""
    config = write_config(tmp_path, {**FAST, "backend": {**FAST["backend"], "host": "monitors"}})
    api = str(PREFECT_API_URL.value())
    service = Service(load_settings(config, env={}), config, api, worker_poll=0.5, warm=True)
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, "mqi")
    deploy(api)
    try:
        with get_client(sync_client=True) as client:
            monitor = client.read_deployment_by_name(MONITOR_DEPLOYMENT).id
            limited = Cancelled(message="Deployment concurrency limit reached.")
            ours = client.create_flow_run_from_deployment(monitor, state=limited)
            other = client.create_flow_run_from_deployment(monitor)
            client.set_flow_run_state(other.id, Running(), force=True)  # the run that holds the place
            service._replace_monitor(client, client.read_flow_run(ours.id))  # ours was cancelled:
            assert (service.monitor_run, service.monitor_owned) == (other.id, False)  # the other watched
            client.set_flow_run_state(other.id, Crashed(message="its process was killed"), force=True)
            service._replace_monitor(client, client.read_flow_run(other.id))  # it ended: start one
            assert service.monitor_owned and service.monitor_run not in (ours.id, other.id)
            of_monitor = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[monitor]))
            runs = client.read_flow_runs(flow_run_filter=of_monitor)
            assert {run.id for run in runs} == {ours.id, other.id, service.monitor_run}

            # No run holds the place, a stopped run's slot lease does (until it expires, up to
            # 300 s): the next monitor is started after a pause that doubles, not at every look.
            held = client.create_flow_run_from_deployment(monitor, state=Cancelled(message=PLACE_HELD))
            service._replace_monitor(client, client.read_flow_run(held.id))
            assert service.monitor_run != held.id and service.monitor_pause == MONITOR_PAUSE_SECONDS
            service._replace_monitor(client, client.read_flow_run(held.id))  # a look during the pause
            assert len(client.read_flow_runs(flow_run_filter=of_monitor)) == 4  # no run started
            service.monitor_paused_until = time.monotonic()  # the pause is over
            service._replace_monitor(client, client.read_flow_run(held.id))
            assert service.monitor_owned and len(client.read_flow_runs(flow_run_filter=of_monitor)) == 5
            client.set_flow_run_state(service.monitor_run, Cancelled(message=PLACE_HELD), force=True)
            service._replace_monitor(client, client.read_flow_run(service.monitor_run))  # held again
            assert service.monitor_pause == 2 * MONITOR_PAUSE_SECONDS
    finally:
        remove_deployments()


def test_a_watched_run_deleted_in_the_ui_is_replaced_and_both_are_read_in_one_call(tmp_path, monkeypatch):
    """`mqi up` reads its sensor and monitor runs in one call every look; one deleted from the
    server (a person deleted it in the UI) is started again, not left unwatched (nor a crash)."""
    config = write_config(tmp_path, {**FAST, "backend": {**FAST["backend"], "host": "deleted"}})
    api = str(PREFECT_API_URL.value())
    service = Service(load_settings(config, env={}), config, api, worker_poll=0.5, warm=True)
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, "mqi")
    deploy(api)
    sensors: list[object] = []
    monkeypatch.setattr(service, "start_sensor", sensors.append)  # a sensor needs a worker; not here
    try:
        with get_client(sync_client=True) as client:
            monitor = client.read_deployment_by_name(MONITOR_DEPLOYMENT).id
            sensor = client.create_flow_run_from_deployment(monitor)  # any run stands for the sensor's
            watched = client.create_flow_run_from_deployment(monitor)
            service.sensor_run, service.monitor_run = sensor.id, watched.id
            assert [run.id for run in service._read_own_runs(client)] == [sensor.id, watched.id]
            assert sensors == []
            client.delete_flow_run(watched.id)
            client.delete_flow_run(sensor.id)
            found_sensor, found_monitor = service._read_own_runs(client)
            assert sensors == [client] and found_sensor is None
            assert service.monitor_run not in (watched.id, None) and service.monitor_owned
            assert found_monitor is None  # the new one is read at the next look
            assert client.read_flow_run(service.monitor_run).deployment_id == monitor
    finally:
        remove_deployments()


@flow
def taken_by_a_worker() -> None:
    """A flow whose runs a test puts in states by hand."""


def test_a_run_a_worker_took_and_never_started_is_marked_crashed_by_the_service():
    """Pending (taken by a worker) and never started: its worker is gone. The server's automation
    would say so, but after a server restart Prefect's triggers hold such events for up to 15
    minutes (the soak's runs stayed Pending that long), so `mqi up` does it too."""
    with get_client(sync_client=True) as client:
        pending = client.create_flow_run(taken_by_a_worker, state=Pending())
        running = client.create_flow_run(taken_by_a_worker, state=Running())
        assert pending.id not in {run.id for run in crash_never_started(client, 3600)}  # not for so long
        assert client.read_flow_run(pending.id).state_type == StateType.PENDING
        crashed = {run.id for run in crash_never_started(client, 0)}
        assert pending.id in crashed and running.id not in crashed
        state = client.read_flow_run(pending.id).state
        assert state is not None and state.type == StateType.CRASHED
        assert state.message.startswith("taken by a worker but not started for 0 s: its worker is gone")
        assert client.read_flow_run(running.id).state_type == StateType.RUNNING
