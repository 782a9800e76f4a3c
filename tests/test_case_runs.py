"""Case runs through the worker: `mqi rerun` and the UI's Retry reuse finished beams; Cancel stops all.

The warm process worker runs the repository's deployments with its MQI_CONFIG, as under
`mqi up`; engine launches are counted in the stand-in engine's launch record.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Cancelling, State, StateType

from deployments.cancel import Reconciler
from deployments.cli import main
from deployments.processes import process_alive
from tasks.backends import JobState
from tasks.backends.local import LocalBackend
from tasks.gpu.broker import gpu_lease
from tasks.gpu.pool import GpuPool
from tests.beams import launches
from tests.conftest import DATABASES, on_database
from tests.invariants import engine_launches, taken_gpu_slots
from tests.service_stack import (
    Stack,
    case_runs,
    finished,
    run_log,
    running_stack,
    small_case,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory) -> Iterator[Stack]:
    """On SQLite, or on PostgreSQL for the tests parametrised so (`indirect`)."""
    with on_database(request, getattr(request, "param", "sqlite")):
        yield from running_stack(tmp_path_factory)


def rerun(stack: Stack, case_id: str, *options: str) -> int:
    return main(["--config", str(stack.config), "rerun", case_id, "--wait", *options])


@pytest.mark.parametrize("stack", DATABASES, indirect=True)
def test_rerun_reuses_every_finished_beam_and_reruns_the_beam_asked_for(stack, capsys):
    small_case(stack.settings.scan_dir, "RERUN-1", beams=2)
    assert rerun(stack, "RERUN-1") == 0  # never run before: every beam is simulated
    mark = stack.launch_log.stat().st_size
    assert rerun(stack, "RERUN-1") == 0
    assert launches(stack.launch_log, mark) == {}
    assert rerun(stack, "RERUN-1", "--beam", "3") == 0
    assert launches(stack.launch_log, mark) == {"3": 1}
    assert "Completed: RERUN-1: 2/2 beams done" in capsys.readouterr().out
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
    assert "2/3 beams done; beam 3 (2G090:TX) failed" in run.state.message
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


def engine_spans(log: Path, case_id: str, since: int) -> dict[str, list[tuple[float, float]]]:
    """Beam number -> (start, end) times of each engine launch of a case, from the launch record."""
    with log.open("rb") as stream:
        stream.seek(since)
        records = [json.loads(line) for line in stream.read().decode().splitlines()]
    starts: dict[int, dict] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        if record["tool"] != "engine" or (record["event"] == "start" and case_id not in record["input"]):
            continue
        if record["event"] == "start":
            starts[record["pid"]] = record
        elif record["pid"] in starts:
            start = starts.pop(record["pid"])
            spans.setdefault(start["key"], []).append((start["time"], record["time"]))
    assert not starts, f"engine launches that never ended: {starts}"
    return {key: sorted(times) for key, times in spans.items()}


@pytest.mark.parametrize("options", [(), ("--force",)], ids=["rerun", "rerun-force"])
def test_a_rerun_while_the_case_runs_waits_for_that_run_and_never_runs_an_engine_beside_it(
    stack, tmp_path, options
):
    case_id = f"TURN-{len(options)}"
    case = small_case(stack.settings.scan_dir, case_id, beams=2)
    mark = stack.launch_log.stat().st_size if stack.launch_log.exists() else 0
    hold = tmp_path / "hold"  # the first run's engines keep running while this file exists
    hold.touch()
    first = run_deployment(
        "process-case/case",
        parameters={"case_dir": str(case)},
        flow_run_name=case_id,
        job_variables={"env": {"MQI_STANDIN_ENGINE_HOLD": str(hold)}},
        timeout=0,
    )
    wait_for("both engines of the first run", lambda: launches(stack.launch_log, mark) == {"2": 1, "3": 1})
    assert main(["--config", str(stack.config), "rerun", case_id, *options]) == 0
    [second] = wait_for("the rerun", lambda: [run for run in case_runs([case_id]) if run.id != first.id])
    seen = ("waiting for its run", "adopting the job")  # it waits (right) or takes the first run's jobs
    wait_for("the rerun to wait or adopt", lambda: any(text in run_log(second.id) for text in seen))
    assert launches(stack.launch_log, mark) == {"2": 1, "3": 1}  # nothing launched beside the first run
    hold.unlink()
    runs = wait_for("both runs to end", lambda: finished([case_id], count=2))
    assert all(run.state_type == StateType.COMPLETED for run in runs), [run.state.message for run in runs]
    spans = engine_spans(stack.launch_log, case_id, mark)
    assert {beam: len(times) for beam, times in spans.items()} == {
        "2": len(runs) if options else 1,
        "3": len(runs) if options else 1,
    }
    for beam, times in spans.items():  # one engine per beam at a time: each starts after the last ended
        assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(times)), (beam, times)
    assert "waiting for its run" in run_log(second.id)


def start_hanging_case(stack: Stack, tmp_path, case_id: str) -> tuple[FlowRun, list[int]]:
    """A two-beam case whose engines hang, run by the worker; once both run and their holders
    are recorded: the run and the engines' pids."""
    case = small_case(stack.settings.scan_dir, case_id, beams=2)
    launch_log = tmp_path / f"{case_id}-launches.jsonl"
    hang = {"MQI_STANDIN_LAUNCH_LOG": str(launch_log), "MQI_STANDIN_ENGINE_FAULT": "hang"}
    run = run_deployment(
        "process-case/case",
        parameters={"case_dir": str(case)},
        flow_run_name=case_id,
        job_variables={"env": hang},
        timeout=0,
    )
    wait_for("both engines to start", lambda: engine_launches(launch_log, case_id) == {2: 1, 3: 1})
    beams = stack.settings.work_dir(case_id) / "beams"
    wait_for("both holders to be recorded", lambda: len(list(beams.glob("*/jobs/*/holder.json"))) == 2)
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    return run, [r["pid"] for r in records if r["tool"] == "engine" and r["event"] == "start"]


def assert_stopped(stack: Stack, case_id: str, engines: list[int]) -> None:
    """The engines are gone, their GPUs free, and their jobs read as stopped (relaunched next time)."""
    wait_for("the engines to be gone", lambda: not any(map(process_alive, engines)), timeout=30)
    assert taken_gpu_slots(stack.settings) == {}
    jobs = LocalBackend(stack.settings).jobs_of_case(case_id)
    assert len(jobs) == 2
    assert all(job.state is JobState.FINISHED_FAILED for job in jobs)
    assert all(job.problem.startswith("it was stopped: case run ") for job in jobs)


def test_mqi_cancel_stops_the_engines_frees_their_gpus_and_says_so(stack, tmp_path, capsys):
    run, engines = start_hanging_case(stack, tmp_path, "CANCEL-ENGINES")
    assert main(["--config", str(stack.config), "cancel", "CANCEL-ENGINES"]) == 0
    [cancelled] = finished(["CANCEL-ENGINES"])
    assert cancelled.state_type == StateType.CANCELLED
    message = cancelled.state.message
    assert message.startswith("stopped the engines of beam 2 (1G000:TX) on GPU ")
    assert "beam 3 (2G090:TX) on GPU " in message and message.endswith("and released their GPUs")
    assert f"CANCEL-ENGINES: Cancelled: {message}" in capsys.readouterr().out
    assert_stopped(stack, "CANCEL-ENGINES", engines)


def test_reconciler_stops_the_engines_of_a_cancelled_run_whose_process_was_killed(stack, tmp_path):
    """Prefect's own worker SIGKILLs a cancelled run: no hook runs, the reconciler stops its engines.
    A Crashed run's engines are kept: it is resumed (its jobs adopted) unless a newer run replaced it."""
    run, engines = start_hanging_case(stack, tmp_path, "CANCEL-KILLED")
    said: list[str] = []
    reconciler = Reconciler(stack.settings, said.append)
    with get_client(sync_client=True) as client:
        os.kill(int(client.read_flow_run(run.id).infrastructure_pid), signal.SIGKILL)
        crashed = lambda: client.read_flow_run(run.id).state_type == StateType.CRASHED  # noqa: E731
        wait_for("the run to be Crashed", crashed)
        reconciler.reconcile(client)
        assert said == [] and all(map(process_alive, engines))  # Crashed: kept for its resume
        client.set_flow_run_state(run.id, State(type=StateType.CANCELLED, name="Cancelled"), force=True)
        reconciler.reconcile(client)
    assert_stopped(stack, "CANCEL-KILLED", engines)
    [line] = said
    assert line.startswith("case run CANCEL-KILLED was cancelled: stopped the engines of beam 2 (1G000:TX)")


def test_retry_of_a_killed_run_takes_its_engines_gpus_at_once(stack, tmp_path):
    """The retried run adopts its killed attempt's running engines without waiting for the dead
    attempt's GPU leases to expire (gpu_lease_seconds: 120 here; the engines run for 30 s)."""
    case = small_case(stack.settings.scan_dir, "ADOPT-NOW", beams=2)
    launch_log = tmp_path / "adopt-launches.jsonl"
    env = {"MQI_STANDIN_LAUNCH_LOG": str(launch_log), "MQI_STANDIN_ENGINE_DURATION": "30"}
    run = run_deployment(
        "process-case/case",
        parameters={"case_dir": str(case)},
        flow_run_name="ADOPT-NOW",
        job_variables={"env": env},
        timeout=0,
    )
    wait_for("both engines to start", lambda: engine_launches(launch_log, "ADOPT-NOW") == {2: 1, 3: 1})
    beams = stack.settings.work_dir("ADOPT-NOW") / "beams"
    wait_for("both holders to be recorded", lambda: len(list(beams.glob("*/jobs/*/holder.json"))) == 2)
    with get_client(sync_client=True) as client:
        os.kill(int(client.read_flow_run(run.id).infrastructure_pid), signal.SIGKILL)
        crashed = lambda: client.read_flow_run(run.id).state_type == StateType.CRASHED  # noqa: E731
        wait_for("the run to be Crashed", crashed)
        client.set_flow_run_state(  # the UI's Retry button
            run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI")
        )
    [done] = wait_for("the retried run to finish", lambda: finished(["ADOPT-NOW"]))
    assert done.state_type == StateType.COMPLETED, done.state.message
    gone = "'s holder is gone (an earlier attempt (1) of this run); its lease is released"
    logged(run.id, [re.escape(gone), "adopting the job running on GPU"], count=2)
    assert engine_launches(launch_log, "ADOPT-NOW") == {2: 1, 3: 1}  # adopted, not launched again


def test_a_beam_waiting_for_a_gpu_says_for_whom_then_which_gpu_it_got_and_logs_its_batches(stack, tmp_path):
    case = small_case(stack.settings.scan_dir, "WAIT-1")
    pool = GpuPool.of(stack.settings.backend)
    with ExitStack() as held:
        for beam in (1, 2, 3, 4):  # every GPU taken by another case
            who = {"case_id": "P2", "beam": f"b{beam}", "beam_number": str(beam)}
            held.enter_context(gpu_lease(pool, who=who))
        run = run_deployment(
            "process-case/case", parameters={"case_dir": str(case)}, flow_run_name="WAIT-1", timeout=0
        )
        wait_for("the beam to say it waits", lambda: "waiting for a GPU" in run_log(run.id))
    [done] = wait_for("the run to finish", lambda: finished(["WAIT-1"]))
    assert done.state_type == StateType.COMPLETED, done.state.message
    lines = (
        re.escape("beam 2 (1G000:TX): waiting for a GPU (4/4 leased: P2 beams 1, 2, 3, 4)"),
        r"beam 2 \(1G000:TX\): got GPU \d after \d+ s",
        r"beam 2 \(1G000:TX\): engine batch 1 of \d+",
    )
    logged(run.id, lines)


def logged(run_id: UUID, patterns: Sequence[str], count: int = 1) -> str:
    """The run's log once each pattern occurs `count` times in it (the server stores log lines in
    batches, some after the run's final state)."""

    def complete() -> str:
        log = run_log(run_id)
        return log if all(len(re.findall(pattern, log)) == count for pattern in patterns) else ""

    return wait_for("the run's log lines", complete, timeout=30)
