"""Case runs through the worker: `mqi rerun` and the UI's Retry reuse finished beams; Cancel stops all.

The warm process worker runs the repository's deployments with its MQI_CONFIG, as under
`mqi up`; engine launches are counted in the stand-in engine's launch record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.states import Cancelling, State, StateType

from deployments.cli import main
from deployments.processes import process_alive
from tests.beams import launches
from tests.service_stack import (
    Stack,
    case_runs,
    finished,
    running_stack,
    small_case,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def stack(prefect_server, tmp_path_factory) -> Iterator[Stack]:
    yield from running_stack(tmp_path_factory)


def rerun(stack: Stack, case_id: str, *options: str) -> int:
    return main(["--config", str(stack.config), "rerun", case_id, "--wait", *options])


def test_rerun_reuses_every_finished_beam_and_reruns_the_beam_asked_for(stack, capsys):
    small_case(stack.settings.scan_dir, "RERUN-1", beams=2)
    assert rerun(stack, "RERUN-1") == 0  # never run before: every beam is simulated
    mark = stack.launch_log.stat().st_size
    assert rerun(stack, "RERUN-1") == 0
    assert launches(stack.launch_log, mark) == {}
    assert rerun(stack, "RERUN-1", "--beam", "3") == 0
    assert launches(stack.launch_log, mark) == {"3": 1}
    assert "Completed: case RERUN-1: 2/2 beams done" in capsys.readouterr().out
    runs = case_runs(["RERUN-1"])
    assert len(runs) == 3 and all("trigger:manual" in run.tags for run in runs)
    assert {tuple(run.parameters.get("rerun_beams", [])) for run in runs} == {(), (3,)}


def test_rerun_after_a_failed_beam_simulates_only_that_beam(stack):
    case = small_case(stack.settings.scan_dir, "FAILED-1", beams=3)
    mark = stack.launch_log.stat().st_size if stack.launch_log.exists() else 0
    failed = run_deployment(
        "process-case/case",
        parameters={"case_dir": str(case)},
        flow_run_name="FAILED-1",
        job_variables={"env": {"MQI_STANDIN_ENGINE_FAULT": "error", "MQI_STANDIN_ENGINE_FAULT_KEYS": "3"}},
        timeout=0,
    )
    [run] = wait_for("the failing run", lambda: finished(["FAILED-1"]))
    assert run.id == failed.id and run.state_type == StateType.FAILED
    assert "2/3 beams done, beam 3 (2G090:TX) failed" in run.state.message
    assert launches(stack.launch_log, mark) == {"2": 1, "3": 1, "4": 1}
    mark = stack.launch_log.stat().st_size
    assert rerun(stack, "FAILED-1") == 0
    assert launches(stack.launch_log, mark) == {"3": 1}


def test_retry_of_a_failed_run_as_the_ui_does_it_reruns_only_the_failed_beam(stack, tmp_path):
    case = small_case(stack.settings.scan_dir, "RETRY-1", beams=3)
    launch_log = tmp_path / "retry-launches.jsonl"  # this run's own record: FAIL_FIRST counts launches in it
    fault = {
        "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
        "MQI_STANDIN_ENGINE_FAIL_FIRST": "1",
        "MQI_STANDIN_ENGINE_FAULT_KEYS": "3",
    }
    run = run_deployment(
        "process-case/case",
        parameters={"case_dir": str(case)},
        flow_run_name="RETRY-1",
        job_variables={"env": fault},
        timeout=0,
    )
    [failed] = wait_for("the failing run", lambda: finished(["RETRY-1"]))
    assert failed.state_type == StateType.FAILED
    with get_client(sync_client=True) as client:  # the UI's Retry button (ui: retryFlowRun)
        client.set_flow_run_state(
            run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI")
        )
        wait_for("the retried run to start", lambda: client.read_flow_run(run.id).run_count == 2)
    [retried] = wait_for("the retried run to finish", lambda: finished(["RETRY-1"]))
    assert retried.id == run.id and retried.state_type == StateType.COMPLETED, retried.state.message
    assert launches(launch_log) == {"2": 1, "3": 2, "4": 1}


def test_cancel_in_the_ui_stops_the_run_and_the_tool_it_is_running(stack, tmp_path):
    case = small_case(stack.settings.scan_dir, "CANCEL-1")
    launch_log = tmp_path / "cancel-launches.jsonl"
    hang = {"MQI_STANDIN_LAUNCH_LOG": str(launch_log), "MQI_STANDIN_INTERPRETER_FAULT": "hang"}
    run = run_deployment(
        "process-case/case",
        parameters={"case_dir": str(case)},
        flow_run_name="CANCEL-1",
        job_variables={"env": hang},
        timeout=0,
    )
    wait_for("the interpreter to start", lambda: launch_log.exists() and launch_log.read_text())
    [interpreter] = [json.loads(line)["pid"] for line in launch_log.read_text().splitlines()]
    with get_client(sync_client=True) as client:  # the UI's Cancel button
        client.set_flow_run_state(run.id, Cancelling(), force=True)
    [cancelled] = wait_for("the run to be cancelled", lambda: finished(["CANCEL-1"]))
    assert cancelled.state_type == StateType.CANCELLED
    wait_for("the hanging interpreter to be gone", lambda: not process_alive(interpreter), timeout=30)
    assert not process_alive(int(cancelled.infrastructure_pid))
