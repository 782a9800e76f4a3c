"""Several machines on one server: the server section, the shared paths, lost runs marked and resumed."""

from __future__ import annotations

import subprocess
import sys
import time
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.worker import EventsWorker
from prefect.states import Completed, Crashed, Pending, Running, Scheduled

from config import ConfigError, load_settings
from deployments.cluster import (
    CRASH_AUTOMATION,
    NEVER_STARTED_AUTOMATION,
    check_shared_paths,
    ensure_crash_automations,
    record_shared_paths,
)
from deployments.server import REPO_ROOT, ServiceError
from tasks.prefect_api.resume import MAX_RESUMES, RESUMED, resume_if_crashed, why_not_resume
from tests.beams import launches
from tests.conftest import write_config
from tests.invariants import check_invariants, newest_case_run, taken_gpu_slots, watch
from tests.local_server import LocalServer, pointed_at
from tests.service_stack import Stack, finished, small_case, wait_for

URL = "postgresql+asyncpg://mqi@db.example.org:5432/prefect"


def test_database_url_takes_its_password_from_the_environment_only(tmp_path):
    config = write_config(tmp_path, {"server": {"database": URL, "password_env": "MQI_DB_PASSWORD"}})
    settings = load_settings(config, env={})
    assert settings.database_url({"MQI_DB_PASSWORD": "p@ss/w:rd"}) == (
        "postgresql+asyncpg://mqi:p%40ss%2Fw%3Ard@db.example.org:5432/prefect"
    )
    with pytest.raises(
        ValueError, match="server.password_env: environment variable MQI_DB_PASSWORD is not set"
    ):
        settings.database_url({})
    assert load_settings(write_config(tmp_path, {}), env={}).database_url({}) is None  # SQLite


def test_a_password_in_the_database_url_is_refused_and_not_repeated(tmp_path):
    config = write_config(tmp_path, {"server": {"database": "postgresql+asyncpg://mqi:hunter2@db/prefect"}})
    with pytest.raises(ConfigError) as error:
        load_settings(config, env={})
    assert "server.database: the URL holds a password" in str(error.value)
    assert "hunter2" not in str(error.value)
    config = write_config(
        tmp_path, {"server": {"database": "mysql://db/prefect", "shared_paths": ["work_dir"]}}
    )
    with pytest.raises(ConfigError) as error:
        load_settings(config, env={})
    assert "server.database: neither 'sqlite' nor postgresql+asyncpg://" in str(error.value)
    assert "server.shared_paths.0" in str(error.value)


@pytest.mark.integration
def test_a_worker_whose_shared_paths_differ_from_the_servers_record_refuses(prefect_server, tmp_path):
    server_machine = load_settings(write_config(tmp_path / "a", {"server": {"machine": "server-a"}}), env={})
    with get_client(sync_client=True) as client:
        record_shared_paths(client, server_machine)
        same = load_settings(tmp_path / "a" / "config.yaml", env={"MQI__SERVER__MACHINE": "gpu-b"})
        check_shared_paths(client, same)  # the same folders: accepted
        other = load_settings(write_config(tmp_path / "c", {"server": {"machine": "gpu-c"}}), env={})
        with pytest.raises(ServiceError) as error:
            check_shared_paths(client, other)
    message = str(error.value)
    assert "machine gpu-c" in message and "differ from the server's record" in message
    for name in ("scan_dir", "output_dir", "results_dir"):
        assert f"{name}: here {tmp_path / 'c' / 'data'}" in message
    assert f"on server-a {tmp_path / 'a' / 'data'}" in message


def crashed_run(deployment: bool, resumed: int) -> tuple[FlowRun, list]:
    run = FlowRun(flow_id=uuid4(), deployment_id=uuid4() if deployment else None, state=Crashed())
    history = [
        Running(),
        *[Scheduled(message=f"{RESUMED} (resume {n + 1})") for n in range(resumed)],
        Crashed(),
    ]
    return run, history


def test_a_crashed_deployment_run_is_resumed_a_bounded_number_of_times():
    assert why_not_resume(*crashed_run(True, 0)) is None
    assert why_not_resume(*crashed_run(True, MAX_RESUMES - 1)) is None
    assert "after 3 resumes; left Crashed" in why_not_resume(*crashed_run(True, MAX_RESUMES))
    assert "not started from a deployment" in why_not_resume(*crashed_run(False, 0))
    run, history = crashed_run(True, 0)
    assert "is Completed, not Crashed" in why_not_resume(
        run.model_copy(update={"state": Completed()}), history
    )


@flow(name="heartbeat-probe")
def probe() -> None:
    """Only a flow for the runs below; never called."""


def heartbeat(run: FlowRun) -> None:
    emit_event("prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"})
    EventsWorker.drain_all(timeout=30)


@pytest.mark.integration
def test_a_run_whose_heartbeats_stop_or_that_never_starts_is_marked_crashed_then_resumed(either_database):
    """The automations `mqi up` creates, on the real server: a lost machine's runs end Crashed."""
    with get_client(sync_client=True) as client:
        ensure_crash_automations(client, silence_seconds=10)
        automations = [
            client.read_automations_by_name(name) for name in (CRASH_AUTOMATION, NEVER_STARTED_AUTOMATION)
        ]
        assert [len(found) for found in automations] == [1, 1]
        try:
            deployment = client.create_deployment(
                flow_id=client.create_flow(probe), name=f"probe-{uuid4().hex[:8]}"
            )
            alive, lost, taken = (client.create_flow_run_from_deployment(deployment) for _ in range(3))
            for run in (alive, lost, taken):
                client.set_flow_run_state(run.id, Pending())
            for run in (alive, lost):
                client.set_flow_run_state(run.id, Running())  # `lost` is killed before its first heartbeat
            # `mqi up` started again meanwhile: the runs already watched are still watched (the
            # update once gave the triggers new ids, and their pending buckets were lost)
            ensure_crash_automations(client, silence_seconds=10)  # does not duplicate them:
            names = [automation.name for [automation] in automations]
            assert [len(client.read_automations_by_name(name)) for name in names] == [1, 1]
            deadline = time.monotonic() + 120
            # `lost` has gone quiet, `taken` was never started; `alive` keeps sending heartbeats.
            while {client.read_flow_run(run.id).state_type for run in (lost, taken)} != {StateType.CRASHED}:
                assert time.monotonic() < deadline, "a lost run was never marked Crashed"
                heartbeat(alive)
                time.sleep(1)
            assert client.read_flow_run(alive.id).state_type == StateType.RUNNING
        finally:
            for [automation] in automations:
                client.delete_automation(automation.id)
        crashed = client.read_flow_run(lost.id)
        assert crashed.state.message == "no heartbeat for 10 s: its worker machine is gone"
        message = client.read_flow_run(taken.id).state.message
        assert message == "taken by a worker but not started for 10 s: its worker machine is gone"
        assert resume_if_crashed(client, crashed, by="the test") is None
        resumed = client.read_flow_run(lost.id)
        assert resumed.state.name == "AwaitingRetry"
        assert resumed.state.message == f"{RESUMED} (resume 1 of at most {MAX_RESUMES}, by the test)"
        client.delete_deployment(deployment)


@pytest.mark.integration
def test_postgres_restarted_mid_case_the_run_finishes_and_no_slot_leaks(postgres, postgres_server, tmp_path):
    with pointed_at(postgres_server):
        stack = Stack(tmp_path / "stack")
        stack.start()
        try:
            stack.start_sensor(stack.config)
            case = watch(small_case(stack.settings.scan_dir, "PG-RESTART", beams=2))

            def engine_started() -> bool:
                return stack.launch_log.is_file() and '"tool": "engine"' in stack.launch_log.read_text()

            wait_for("the case's first engine", engine_started)
            postgres.stop("fast")  # every connection of the server is cut
            postgres.start()
            wait_for("the case run to end", lambda: finished(["PG-RESTART"]), timeout=300)
            wait_for("every GPU slot free", lambda: taken_gpu_slots(stack.settings) == {}, timeout=180)
            check_invariants(
                stack.settings,
                stack.launch_log,
                case,
                state=StateType.COMPLETED,
                launches={2: 1, 3: 1},
                done=(2, 3),
            )
        finally:
            stack.stop()


def heartbeats_of(run_id: UUID) -> list:
    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(
                event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
            ),
            limit=50,
        )
    return page.events


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_mqi_run_is_marked_crashed_by_its_silence_and_the_next_run_adopts_its_engines(tmp_path):
    """A bare `mqi run` sends heartbeats like a worker's run: on a server with `mqi up`'s automations
    it is not taken for lost while it runs, and once SIGKILLed it ends Crashed within the silence,
    so the next run of its case does not wait for it for ever and adopts its engines."""
    silence = 50  # heartbeats come every 30 s (Prefect's least)
    server = LocalServer(tmp_path / "prefect")
    server.home.mkdir()
    server.start()
    try:
        with pointed_at(server), get_client(sync_client=True) as client:
            ensure_crash_automations(client, silence_seconds=silence)
            config = write_config(tmp_path, {"backend": {"host": "killed-run", "gpus": [0, 1]}})
            case_dir = small_case(load_settings(config, env={}).scan_dir, "KILLED-RUN", beams=2)
            launch_log, hold = tmp_path / "launches.jsonl", tmp_path / "hold"
            hold.touch()  # the engines keep running while it exists
            env = {
                **server.env(),
                "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
                "MQI_STANDIN_ENGINE_HOLD": str(hold),
            }
            argv = [sys.executable, "-m", "deployments.cli", "--config", str(config), "run", str(case_dir)]
            first = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
            try:
                wait_for("both engines to start", lambda: len(launches(launch_log)) == 2)
                run = newest_case_run("KILLED-RUN")
                # Three heartbeats span 60 s, longer than the silence: alive, so still Running.
                wait_for("three heartbeats", lambda: len(heartbeats_of(run.id)) >= 3, timeout=150)
                assert client.read_flow_run(run.id).state_type == StateType.RUNNING
            finally:
                first.kill()  # SIGKILL: it cannot report; its engines go on
                first.wait()
            crashed = wait_for(
                "the killed run to be marked Crashed",
                lambda: (found := client.read_flow_run(run.id)).state_type == StateType.CRASHED and found,
                timeout=silence + 90,
            )
            assert crashed.state.message == f"no heartbeat for {silence} s: its worker machine is gone"
            hold.unlink()
            again = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, again.stdout + again.stderr
            assert launches(launch_log) == {"2": 1, "3": 1}  # adopted, not launched again
            assert newest_case_run("KILLED-RUN").state_type == StateType.COMPLETED
            for automation in client.read_automations_by_name(CRASH_AUTOMATION):
                client.delete_automation(automation.id)
    finally:
        server.stop()
