"""prefect.yaml deploys as it is, and `mqi up` runs a dropped case and stops only what it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL

from config import load_settings
from deployments.cli import main
from deployments.processes import descendants, process_alive, stop_tree
from deployments.server import PREFECT_CLI, REPO_ROOT, ensure_work_pool, healthy
from tests.conftest import write_config
from tests.service_stack import FAST, finished, remove_deployments, small_case, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture
def clean_deployments() -> Iterator[None]:
    yield
    remove_deployments()


def test_prefect_deploy_all_deploys_the_repository_prefect_yaml(clean_deployments):
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, "mqi")  # prefect.yaml's pool must exist first
    done = subprocess.run(
        [PREFECT_CLI, "--no-prompt", "deploy", "--all"],
        cwd=REPO_ROOT,
        env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    here = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}]
    with get_client(sync_client=True) as client:
        case = client.read_deployment_by_name("process-case/case")
        sensor = client.read_deployment_by_name("file-sensor/sensor")
        gpus = client.read_deployment_by_name("gpu-monitor/gpus")
    assert (case.entrypoint, case.work_pool_name, case.work_queue_name) == (
        "flows/case.py:process_case",
        "mqi",
        "cases",
    )
    assert set(case.parameter_openapi_schema["properties"]) == {"case_dir", "config", "rerun_beams", "force"}
    assert sensor.entrypoint == "flows/sensor.py:file_sensor" and "file sensor" in sensor.description
    assert gpus.entrypoint == "flows/gpu_monitor.py:gpu_monitor"
    assert gpus.schedules == [] and "until cancelled" in gpus.description  # one run, not one a minute
    assert all(deployment.pull_steps == here for deployment in (case, sensor, gpus))


def test_mqi_up_runs_a_dropped_case_and_ctrl_c_stops_what_it_started(tmp_path, clean_deployments, capsys):
    config = write_config(tmp_path, FAST)
    settings = load_settings(config, env={})
    api = str(PREFECT_API_URL.value())
    out = tmp_path / "up.out"
    mqi = os.path.join(os.path.dirname(sys.executable), "mqi")
    with out.open("wb") as log:
        up = subprocess.Popen(
            [mqi, "--config", str(config), "up"],
            env={**os.environ, "PREFECT_API_URL": api},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for("mqi up to be up", lambda: up.poll() is not None or "is up" in out.read_text())
        assert up.poll() is None, out.read_text()
        assert f"using the Prefect server at {api}" in out.read_text()
        assert f"scan folder: {settings.scan_dir}" in out.read_text()
        started = descendants(up.pid)  # the worker, the sensor's flow run process, ...
        small_case(settings.scan_dir, "UP-1")
        [run] = wait_for("the dropped case to finish", lambda: finished(["UP-1"]))
        assert run.state_type == StateType.COMPLETED, run.state.message
        assert "trigger:sensor" in run.tags
        assert main(["--config", str(config), "status"]) == 0
        assert "UP-1" in capsys.readouterr().out
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0, out.read_text()
    finally:
        if up.poll() is None:
            stop_tree(up.pid)
            up.wait()
    assert [pid for pid in started if process_alive(pid)] == []
    assert healthy(api)  # the server was reused, so it is left running
    with get_client(sync_client=True) as client:
        sensor, monitor = (
            client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=1,
            )[0]
            for flow in ("file-sensor", "gpu-monitor")
        )
    assert sensor.state_type == StateType.CANCELLED, sensor.state.message
    assert monitor.state_type == StateType.CANCELLED, monitor.state.message
    assert (sensor.name, monitor.name) == ("sensor", "gpu-monitor")  # fixed names, one run each
