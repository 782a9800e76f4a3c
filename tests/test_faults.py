"""The crash and fault suite (issue 6): real processes, real failures, the same invariants at the end.

Every scenario breaks something for real (SIGKILL of a flow-run process, of the Prefect
server, sshd stopped, a stand-in engine or interpreter that errs, crashes or hangs, a full
filesystem) and ends with tests/invariants.py: every case Completed, or Failed naming the
cause; each engine launched exactly as often as a retry was due; no GPU slot taken; every
RTDOSE matching its provenance; no input file changed.

The module runs on one real `prefect server start` (tests/local_server.py): scenario 2
kills and restarts it, and only a real server expires the GPU leases of a killed run
(the test harness runs no repossessor).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.states import State

from config import Settings, load_settings
from deployments.cli import main
from deployments.processes import process_alive
from deployments.server import REPO_ROOT
from flows.case import process_case
from tasks.outcome.summary import artifact_key
from tests.conftest import write_config
from tests.invariants import Watched, check_invariants, engine_launches, newest_case_run, watch
from tests.local_server import LocalServer, pointed_at
from tests.service_stack import Stack, run_log, small_case, wait_for
from tests.sshd import Hpc, Sshd
from tests.test_case_flow import read_artifacts

pytestmark = pytest.mark.integration

# Small and quick: a 20^3 phantom, one retry after 0.1 s, no DICOM validator (tested elsewhere).
QUICK = {
    "engine": {"poll_seconds": 0.1, "retries": 1, "retry_delay_seconds": [0.1], "timeout_seconds": 120},
    "tps": {"phantom": {"dims": [20, 20, 20], "unit_mm": [10.0, 10.0, 10.0]}},
    "dicom": {"validator": None},
}
DOSE_BYTES = 20**3 * 8
THREE_GPUS = "".join(
    f"{i}, GPU-{i}, NVIDIA A100-SXM4-40GB, 40960, 4, 40536, 31, 0\n" for i in range(3)
)  # nvidia-smi on the fake node: three idle GPUs


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LocalServer]:
    """The module's Prefect server; this process and every process it starts use it."""
    local = LocalServer(tmp_path_factory.mktemp("prefect-home"))
    local.start()
    try:
        with pointed_at(local):
            yield local
    finally:
        local.stop()


def quick_config(root: Path, host: str, **sections: dict) -> Settings:
    """QUICK plus `sections`, with GPU limits of its own (`host`) on the module's server."""
    merged = {name: {**QUICK.get(name, {}), **sections.get(name, {})} for name in {*QUICK, *sections}}
    merged["backend"] = {"gpu_lease_seconds": 60, **merged.get("backend", {}), "host": host}
    return load_settings(write_config(root, merged), env={})


def ssh_sections(hpc: Hpc, sshd: Sshd, gpus: list[int], **ssh: object) -> dict[str, dict]:
    return {
        "backend": {**hpc.backend_settings(), "gpus": gpus},
        "ssh": hpc.ssh_settings(sshd, cleanup="keep", **ssh),
    }


def run_in_process(settings: Settings, case: Watched) -> State:
    return process_case(str(case.case_dir), str(settings.source), return_state=True)


def mqi_run(settings: Settings, case: Watched, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`mqi run CASE` in a process of its own, output in <data root>/mqi-run-<case>.log."""
    with (settings.root / f"mqi-run-{case.case_id}.log").open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployments.cli",
                "--config",
                str(settings.source),
                "run",
                str(case.case_dir),
            ],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def ended(launch_log: Path, count: int) -> bool:
    """Whether `count` engine runs have ended (the stand-in's "end" records)."""
    if not launch_log.exists():
        return False
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    return sum(r["tool"] == "engine" and r["event"] == "end" for r in records) >= count


# -- 1. the flow-run process SIGKILLed while its beams run on the HPC ---------------------------


def test_killed_case_runs_adopt_their_engines_on_retry_and_on_rerun(server, sshd, hpc, tmp_path):
    """Two case runs on the HPC over SSH are SIGKILLed mid-simulation; one is retried from the
    API as the UI's Retry does, the other run again with `mqi rerun`.

    Three GPUs for four beams: at the kill, KILL-RETRY runs both its engines and KILL-RERUN
    one, its other beam waiting for a GPU. The running engines are adopted (once the dead
    runs' GPU leases expire), never launched again; only the waiting beam is launched.
    """
    hpc.set_nvidia_smi(THREE_GPUS, "")
    ssh = ssh_sections(hpc, sshd, [0, 1, 2])
    stack = Stack(tmp_path, {**ssh, "backend": {**ssh["backend"], "host": "kill", "gpu_lease_seconds": 60}})
    stack.start()
    try:
        retry, rerun = (
            watch(small_case(stack.settings.scan_dir, name, beams=2)) for name in ("KILL-RETRY", "KILL-RERUN")
        )
        runs = {}
        for case, launched in ((retry, {2: 1, 3: 1}), (rerun, {2: 1})):
            runs[case.case_id] = run_deployment(
                "process-case/case",
                parameters={"case_dir": str(case.case_dir)},
                flow_run_name=case.case_id,
                job_variables={"env": {"MQI_STANDIN_ENGINE_DURATION": "30"}},  # still running when adopted
                timeout=0,
            )
            wait_for(
                f"{case.case_id}'s engines to start",
                lambda case=case, launched=launched: (
                    sorted(engine_launches(stack.launch_log, case.case_id).values())
                    == sorted(launched.values())
                ),
            )
        with get_client(sync_client=True) as client:
            for run in runs.values():
                os.kill(int(client.read_flow_run(run.id).infrastructure_pid), signal.SIGKILL)
            for run in runs.values():
                wait_for(
                    "the worker to report the killed run Crashed",
                    lambda run=run: client.read_flow_run(run.id).state_type == StateType.CRASHED,
                    timeout=60,
                )
            jobs = {job: job.read_text() for job in hpc.remote_root.glob("KILL-*/beam-*/*/job.json")}
            assert len(jobs) == 3 and not any((job.parent / "exit.json").exists() for job in jobs)
            client.set_flow_run_state(  # the UI's Retry button (ui: retryFlowRun)
                runs["KILL-RETRY"].id,
                State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"),
            )
        assert main(["--config", str(stack.config), "rerun", "KILL-RERUN", "--wait"]) == 0
        wait_for(
            "the retried run to finish",
            lambda: (state := newest_case_run("KILL-RETRY").state) is not None and state.is_final(),
        )
        adopted = {}
        for case in (retry, rerun):
            run = check_invariants(
                stack.settings,
                stack.launch_log,
                case,
                state=StateType.COMPLETED,
                launches={2: 1, 3: 1},
                done=(2, 3),
            )
            # Adopted while it ran, or (the machine being slow) collected once it had finished;
            # never launched again (the launches above).
            log = run_log(run.id)
            adopted[case.case_id] = log.count("adopting the job running on GPU") + log.count(
                "collecting the job that finished"
            )
            for beam in (2, 3):  # each dose comes from the job on the GPU its provenance names
                path = stack.settings.output_dir(case.case_id) / f"RTDOSE_beam0{beam}.provenance.json"
                provenance = json.loads(path.read_text())["beams"][0]
                assert (
                    json.loads((Path(provenance["job_dir"]) / "job.json").read_text())["gpu"]
                    == provenance["gpu"]
                )
        assert adopted == {"KILL-RETRY": 2, "KILL-RERUN": 1}
        assert {job: job.read_text() for job in jobs} == jobs  # the same jobs, none started again
        assert newest_case_run("KILL-RETRY").id == runs["KILL-RETRY"].id  # the same run, retried
    finally:
        stack.stop()


# -- 2. the Prefect server killed and restarted mid-case -----------------------------------------


def test_server_killed_and_restarted_mid_case(server, tmp_path):
    settings = quick_config(tmp_path, "restart", backend={"gpus": [0, 1]})
    case = watch(small_case(settings.scan_dir, "SERVER-DOWN", beams=2))
    launch_log = tmp_path / "launches.jsonl"
    env = {"MQI_STANDIN_LAUNCH_LOG": str(launch_log), "MQI_STANDIN_ENGINE_DURATION": "3"}
    run = mqi_run(settings, case, env)
    try:
        wait_for("both engines to start", lambda: engine_launches(launch_log, case.case_id) == {2: 1, 3: 1})
        server.kill()
        wait_for("both engines to end while the server is down", lambda: ended(launch_log, 2), timeout=60)
        server.start()
        assert run.wait(timeout=300) == 0
    finally:
        run.kill()
    check_invariants(
        settings, launch_log, case, state=StateType.COMPLETED, launches={2: 1, 3: 1}, done=(2, 3)
    )


# -- 3. sshd stopped for longer than one poll interval, then back ---------------------------------


def test_sshd_down_for_longer_than_a_poll_then_back(server, hpc, tmp_path):
    sshd = Sshd(tmp_path / "own-sshd")  # its own server: this test stops it
    sshd.start()
    try:
        settings = quick_config(tmp_path, "sshd-down", **ssh_sections(hpc, sshd, [0, 1], poll_seconds=0.5))
        case = watch(small_case(settings.scan_dir, "SSHD-DOWN", beams=2))
        launch_log = tmp_path / "launches.jsonl"
        run = mqi_run(
            settings, case, {"MQI_STANDIN_LAUNCH_LOG": str(launch_log), "MQI_STANDIN_ENGINE_DURATION": "4"}
        )
        try:
            wait_for(
                "both engines to start", lambda: engine_launches(launch_log, case.case_id) == {2: 1, 3: 1}
            )
            sshd.stop()
            flow_run = newest_case_run(case.case_id)
            wait_for(
                "both beams to notice the lost connection",
                lambda: run_log(flow_run.id).count("reconnecting") >= 2,
                timeout=60,
            )
            sshd.start()
            assert run.wait(timeout=300) == 0
        finally:
            run.kill()
    finally:
        sshd.stop()
    check_invariants(
        settings, launch_log, case, state=StateType.COMPLETED, launches={2: 1, 3: 1}, done=(2, 3)
    )


# -- 4. the engine fails once, crashes every time, or hangs --------------------------------------


def run_with_faulty_beam_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, fault: dict[str, str], **sections: dict
) -> tuple[Settings, Watched, Path]:
    """A two-beam case run in this process, the stand-in engine told to misbehave on beam 3."""
    settings = quick_config(tmp_path, name.lower(), **sections)
    case = watch(small_case(settings.scan_dir, name, beams=2))
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_FAULT_KEYS", "3")
    for variable, value in fault.items():
        monkeypatch.setenv(variable, value)
    run_in_process(settings, case)
    return settings, case, launch_log


def test_engine_failing_once_is_retried_and_the_case_completes(server, tmp_path, monkeypatch):
    settings, case, launch_log = run_with_faulty_beam_3(
        tmp_path, monkeypatch, "FAIL-ONCE", {"MQI_STANDIN_ENGINE_FAIL_FIRST": "1"}
    )
    check_invariants(
        settings, launch_log, case, state=StateType.COMPLETED, launches={2: 1, 3: 2}, done=(2, 3)
    )
    provenance = json.loads((settings.output_dir(case.case_id) / "RTDOSE_beam03.provenance.json").read_text())
    assert provenance["beams"][0]["attempts"] == 2


def test_engine_crashing_every_time_fails_its_beam_with_the_log_tail(server, tmp_path, monkeypatch):
    settings, case, launch_log = run_with_faulty_beam_3(
        tmp_path, monkeypatch, "CRASH", {"MQI_STANDIN_ENGINE_FAULT": "segfault"}
    )
    check_invariants(
        settings,
        launch_log,
        case,
        state=StateType.FAILED,
        launches={2: 1, 3: 2},  # one retry (engine.retries: 1), then the beam fails
        causes=("1/2 beams done", "beam 3 (2G090:TX) failed", "engine crashed (SIGSEGV"),
        done=(2,),
    )
    [summary] = read_artifacts(f"{artifact_key(case.case_id)}-summary")
    assert "## Beam 3 (2G090:TX) failed" in summary.data
    assert "Generating particles for (1 of " in summary.data  # the engine log's tail


def test_hanging_engine_is_killed_after_the_beam_timeout(server, tmp_path, monkeypatch):
    settings, case, launch_log = run_with_faulty_beam_3(
        tmp_path, monkeypatch, "HANG", {"MQI_STANDIN_ENGINE_FAULT": "hang"}, engine={"timeout_seconds": 5}
    )
    check_invariants(
        settings,
        launch_log,
        case,
        state=StateType.FAILED,
        launches={2: 1, 3: 2},
        causes=("beam 3 (2G090:TX) failed", "engine did not finish within 5 s and was killed"),
        done=(2,),
    )
    hung = [r["pid"] for r in map(json.loads, launch_log.read_text().splitlines()) if r["key"] == "3"]
    assert len(hung) == 2 and not any(map(process_alive, hung))  # killed, not left on their GPUs


# -- 5. the local disk fills during a download --------------------------------------------------


@pytest.fixture
def small_filesystem() -> Iterator[Callable[[Path, str], None]]:
    """mount(folder, size): a tmpfs of `size` on `folder` (root only), unmounted by the test or at the end."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(folder)

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_disk_full_during_download_then_space_returns(
    server, sshd, hpc, tmp_path, monkeypatch, small_filesystem
):
    settings = quick_config(tmp_path, "disk-full", **ssh_sections(hpc, sshd, [0, 1]))
    case = watch(small_case(settings.scan_dir, "DISK-FULL", beams=2))
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    dose_dir = settings.work_dir(case.case_id) / "beams" / "beam-02" / "dose"
    small_filesystem(dose_dir, "16k")  # beam 2's raw dose is 64000 bytes

    run_in_process(settings, case)
    check_invariants(
        settings,
        launch_log,
        case,
        state=StateType.FAILED,
        launches={2: 1, 3: 1},  # the download failed, not the engine: it is not run again
        causes=("beam 2 (1G000:TX) failed: cannot store the dose here",),
        done=(3,),
    )
    message = newest_case_run(case.case_id).state.message
    assert "No space left on device" in message and f"{dose_dir}/" in message
    assert list(dose_dir.iterdir()) == []  # neither a partial file nor one renamed into place

    subprocess.run(["umount", str(dose_dir)], check=True)  # space returns
    run_in_process(settings, case)
    check_invariants(
        settings, launch_log, case, state=StateType.COMPLETED, launches={2: 1, 3: 1}, done=(2, 3)
    )
    assert Path(dose_dir).joinpath("1G000:TX_1_Dose.raw").stat().st_size == DOSE_BYTES


# -- 6. the interpreter fails or times out --------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("error", "the interpreter exited with code 1"),
        ("hang", "the interpreter did not finish within 3 s and was killed"),
    ],
)
def test_interpreter_failure_fails_the_case_before_any_beam(server, tmp_path, monkeypatch, fault, cause):
    settings = quick_config(tmp_path, f"interpreter-{fault}", interpreter={"timeout_seconds": 3})
    case = watch(small_case(settings.scan_dir, f"INTERPRETER-{fault.upper()}", beams=2))
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_INTERPRETER_FAULT", fault)
    run_in_process(settings, case)
    run = check_invariants(settings, launch_log, case, state=StateType.FAILED, launches={}, causes=(cause,))
    if fault == "error":  # the tool's own last words
        assert f"Error: injected error for case {case.case_id} (attempt 1)" in run.state.message
