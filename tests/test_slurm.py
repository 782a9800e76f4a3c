"""The Slurm backend against a real single-node Slurm (tests/slurm.py): 4 fake GPUs, no slurmdbd.

Every test shares the session's cluster (the `slurm` fixture) and runs in the `slurm` group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed, State, StateType

from config import Settings, load_settings
from deployments.cli import main
from deployments.server import REPO_ROOT
from flows.case import process_case
from tasks.backends import JobState, make_backend
from tasks.backends.cancel import stop_case_jobs
from tasks.backends.slurm import ACTIVE, SlurmLocalBackend, SlurmSshBackend, job_name
from tasks.backends.sshconn import close_all
from tests.beams import launch, launches, prepare_beams, run_beam
from tests.conftest import write_config
from tests.invariants import newest_case_run, taken_gpu_slots, taken_queue_places
from tests.service_stack import Stack, case_runs, small_case, wait_for
from tests.slurm import SlurmCluster
from tests.sshd import Hpc, Sshd
from tests.test_case_flow import dciodvfy_errors, flow_run_artifacts
from tests.test_faults import ended, run_log

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


def slurm_settings(root: Path, **sections: dict) -> Settings:
    """The test config with beams as Slurm jobs (polled every 0.2 s), plus `sections`."""
    merged = {
        "backend": {"kind": "slurm", "host": "slurmtest", "gpus": [0, 1, 2, 3]},
        "slurm": {"poll_seconds": 0.2, "command_timeout_seconds": 10},
        "engine": {"timeout_seconds": 300},
    }
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return load_settings(write_config(root, merged), env={})


def engine_starts(launch_log: Path) -> list[dict]:
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    ends = {r["pid"]: r["time"] for r in records if r["tool"] == "engine" and r["event"] == "end"}
    return [
        {**r, "ended": ends.get(r["pid"])} for r in records if r["tool"] == "engine" and r["event"] == "start"
    ]


def most_at_once(starts: list[dict]) -> int:
    """The most engines that ran at the same time, and never two on one physical GPU."""
    most = 0
    for run in starts:
        during = [o for o in starts if o["launched"] <= run["launched"] < (o["ended"] or float("inf"))]
        devices = [o["cuda_visible_devices"] for o in during]
        assert len(set(devices)) == len(devices), f"two engines on one GPU: {devices}"
        most = max(most, len(during))
    return most


def test_one_beam_is_a_slurm_job_on_its_allocated_gpu(slurm: SlurmCluster, tmp_path, monkeypatch):
    settings = slurm_settings(tmp_path)
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    backend = make_backend(settings)
    assert isinstance(backend, SlurmLocalBackend) and not backend.gpu_leases
    [beam] = prepare_beams(settings, "SLURM-ONE")
    assert backend.lookup(beam).state is JobState.MISSING
    followed = run_beam(backend, beam, gpu=3)  # the GPU asked for is Slurm's to choose: ignored
    job = followed.job
    assert job.state is JobState.FINISHED_OK and job.queued and job.queued.job_id.isdigit()
    [start] = engine_starts(launch_log)
    assert start["gpu"] == 0  # GPUID: the one allocated GPU is CUDA device 0
    assert start["cuda_visible_devices"] == str(job.gpu)  # the record says which physical GPU
    assert (Path(job.dir) / "slurm.id").read_text().strip() == job.queued.job_id
    assert f"SLURM_JOB_GPUS={job.gpu}" in (Path(job.dir) / "slurm.out").read_text()
    # The engine's exit record comes first; Slurm says COMPLETED once the batch script has exited.
    completed = {"id": job.queued.job_id, "name": "mqi-SLURM-ONE-beam-02", "state": "COMPLETED"}
    wait_for("Slurm to record the job COMPLETED", lambda: completed in slurm.jobs(), timeout=60)
    found = backend.lookup(beam)  # finished: collected by a later run, not submitted again
    assert found.state is JobState.FINISHED_OK and found.queued.job_id == job.queued.job_id


@pytest.mark.usefixtures("prefect_server")
def test_whole_case_on_four_gpus_every_beam_a_slurm_job(slurm: SlurmCluster, tmp_path, monkeypatch):
    settings = slurm_settings(tmp_path)
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "2")
    case_dir = small_case(settings.scan_dir, "SLURM-CASE", beams=4)
    state = process_case(str(case_dir), str(settings.source), return_state=True)
    assert state.is_completed(), state.message
    starts = engine_starts(launch_log)
    assert len(starts) == 4 and {s["gpu"] for s in starts} == {0}
    assert most_at_once(starts) <= 4
    names = [job["name"] for job in slurm.jobs()]
    assert sorted(n for n in names if n.startswith("mqi-SLURM-CASE-")) == [
        f"mqi-SLURM-CASE-beam-{n:02d}" for n in (2, 3, 4, 5)
    ]
    out = settings.output_dir("SLURM-CASE")
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 5
    gpus = []
    for path in files:
        assert dciodvfy_errors(path) == [], path.name
        if path.name != "RTDOSE_plan.dcm":
            gpus.append(
                json.loads(path.with_name(path.stem + ".provenance.json").read_text())["beams"][0]["gpu"]
            )
    assert sorted(gpus) == sorted(int(s["cuda_visible_devices"]) for s in starts)  # the physical GPUs


def slurm_job(slurm: SlurmCluster, name: str, state: str) -> str | None:
    """The id of the job named `name` once Slurm shows it in `state`."""
    return next((job["id"] for job in slurm.jobs() if job["name"] == name and job["state"] == state), None)


@pytest.mark.usefixtures("prefect_server")
def test_failed_timed_out_and_cancelled_jobs_name_their_slurm_state(slurm, tmp_path, monkeypatch):
    """Beam 2's engine fails (retried once), beam 3 exceeds its 1 min time limit, beam 4 is scancelled."""
    settings = slurm_settings(tmp_path, slurm={"time_limit_minutes": 1})
    launch_log = tmp_path / "launches.jsonl"
    for name, value in {
        "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
        "MQI_STANDIN_ENGINE_DURATION": "200",
        "MQI_STANDIN_ENGINE_FAIL_FIRST": "9",
        "MQI_STANDIN_ENGINE_FAULT_KEYS": "2",
    }.items():
        monkeypatch.setenv(name, value)
    case_dir = small_case(settings.scan_dir, "SLURM-FAULTS", beams=3)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(process_case, str(case_dir), str(settings.source), return_state=True)
        wait_for("beam 4's engine to start", lambda: launches(launch_log).get("4"))
        cancelled = slurm_job(slurm, "mqi-SLURM-FAULTS-beam-04", "RUNNING")
        assert cancelled and slurm.command("scancel", cancelled).returncode == 0
        state = run.result(timeout=240)
    assert state.is_failed()
    message = state.message
    assert "0/3 beams done" in message, message
    beam2, beam3, beam4 = (message.split(f"beam {n} (")[1].split("; beam")[0] for n in (2, 3, 4))
    assert "CUDA error" in beam2 and "FAILED" in beam2, beam2
    assert "ended TIMEOUT without an exit record" in beam3 and "time limit is 1 min" in beam3, beam3
    assert f"Slurm job {cancelled} ended CANCELLED" in beam4, beam4
    assert launches(launch_log) == {"2": 2, "3": 1, "4": 1}  # TIMEOUT and CANCELLED are not retried


@pytest.mark.usefixtures("prefect_server")
def test_hostile_case_names_go_through_sbatch_as_words(slurm: SlurmCluster, tmp_path, monkeypatch):
    settings = slurm_settings(tmp_path)
    monkeypatch.chdir(tmp_path)  # where a word that escaped its quotes would touch its canary
    names = ["with space", 'quote\'d "double"', "$(touch mqi-canary-1)", "`touch mqi-canary-2`;x", "50%j"]
    with ThreadPoolExecutor(len(names)) as pool:
        runs = {
            name: pool.submit(
                process_case,
                str(small_case(settings.scan_dir, name)),
                str(settings.source),
                return_state=True,
            )
            for name in names
        }
        for name, run in runs.items():
            state = run.result(timeout=300)
            assert state.is_completed(), f"{name}: {state.message}"
            assert list(settings.output_dir(name).glob("RTDOSE_*.dcm")), name
    assert not list(tmp_path.rglob("mqi-canary-*")) and not list(Path("/").glob("mqi-canary-*"))
    assert len(list(settings.root.rglob("slurm.out"))) == len(names)  # each job's output in its folder


def other_users_jobs(slurm: SlurmCluster, folder: Path, count: int) -> list[str]:
    """`count` jobs of someone else, each holding a GPU, once Slurm runs them all; their ids."""
    blockers = [
        slurm.command("sbatch", "--parsable", "--gres=gpu:1", "--job-name=other-user", f"--chdir={folder}",
                      "--output=/dev/null", "--wrap=sleep 600").stdout.strip()
        for _ in range(count)
    ]  # fmt: skip
    try:
        wait_for(
            "the other jobs to run",
            lambda: [j["state"] for j in slurm.jobs() if j["id"] in blockers] == ["RUNNING"] * count,
        )
    except BaseException:
        slurm.command("scancel", *blockers)
        raise
    return blockers


@pytest.mark.usefixtures("prefect_server")
def test_three_cases_of_four_beams_on_two_free_gpus_queue_in_slurm(slurm, tmp_path, monkeypatch, caplog):
    """Two GPUs are taken by someone else's jobs: Slurm queues the other beams (pending: Resources)."""
    settings = slurm_settings(tmp_path)
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "1")
    blockers = other_users_jobs(slurm, tmp_path, 2)
    try:
        cases = [small_case(settings.scan_dir, f"SLURM-Q{k}", beams=4) for k in range(3)]
        with ThreadPoolExecutor(3) as pool:
            runs = [pool.submit(process_case, str(c), str(settings.source), return_state=True) for c in cases]
            states = [run.result(timeout=300) for run in runs]
    finally:
        slurm.command("scancel", *blockers)
    assert all(state.is_completed() for state in states), [state.message for state in states]
    starts = engine_starts(launch_log)
    assert len(starts) == 12 and {s["gpu"] for s in starts} == {0}
    assert most_at_once(starts) <= 2
    assert "pending: Resources" in caplog.text  # the beams' logs say why they wait


def case_job_names(slurm: SlurmCluster, case_id: str) -> list[str]:
    return sorted(job["name"] for job in slurm.jobs() if job["name"].startswith(f"mqi-{case_id}-"))


@pytest.mark.usefixtures("prefect_server")
def test_killed_flow_run_process_then_run_again_adopts_the_jobs(slurm: SlurmCluster, tmp_path):
    """`mqi run` SIGKILLed while both beams' jobs run; the next run adopts them by job id."""
    settings = slurm_settings(tmp_path)
    launch_log = tmp_path / "launches.jsonl"
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
        "MQI_STANDIN_ENGINE_DURATION": "25",  # still running when the next run (~10 s to start) looks
    }
    case_dir = small_case(settings.scan_dir, "SLURM-KILL", beams=2)
    argv = [sys.executable, "-m", "deployments.cli", "--config", str(settings.source), "run", str(case_dir)]
    first = subprocess.Popen(
        argv, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for("both engines to start", lambda: len(launches(launch_log)) == 2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # A SIGKILLed `mqi run` cannot report: its run stays Running, and one run of a case at a
    # time would make the next run wait for it. `mqi up` marks such a run Crashed
    # (deployments/stranded.py); here, with no service, the test does it as an operator would.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            newest_case_run("SLURM-KILL").id, Crashed(message="its mqi run was killed"), force=True
        )
    ids = sorted(job["id"] for job in slurm.jobs() if job["name"].startswith("mqi-SLURM-KILL-"))
    again = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert launches(launch_log) == {"2": 1, "3": 1}  # each engine ran once
    assert case_job_names(slurm, "SLURM-KILL") == ["mqi-SLURM-KILL-beam-02", "mqi-SLURM-KILL-beam-03"]
    log = run_log(newest_case_run("SLURM-KILL").id)
    for job_id in ids:  # found by id: still running (adopted), or finished meanwhile on a loaded machine
        assert (
            f"adopting the job running as Slurm job {job_id} on" in log
            or f"collecting the job that finished as Slurm job {job_id} on" in log
        ), log


@pytest.mark.usefixtures("prefect_server")
def test_slurmctld_stopped_and_restarted_while_jobs_run(slurm: SlurmCluster, tmp_path, monkeypatch, caplog):
    settings = slurm_settings(tmp_path, slurm={"command_timeout_seconds": 2})
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "12")  # the stand-in takes seconds to start under load
    case_dir = small_case(settings.scan_dir, "SLURM-CTLD", beams=2)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(process_case, str(case_dir), str(settings.source), return_state=True)
        wait_for("both engines to start", lambda: len(launches(launch_log)) == 2)
        slurm.stop_controller()
        try:
            wait_for("both engines to end", lambda: ended(launch_log, 2))
        finally:
            slurm.start_controller()
        state = run.result(timeout=180)
    assert state.is_completed(), state.message
    assert launches(launch_log) == {"2": 1, "3": 1}
    assert case_job_names(slurm, "SLURM-CTLD") == ["mqi-SLURM-CTLD-beam-02", "mqi-SLURM-CTLD-beam-03"]
    assert "Slurm did not say how job" in caplog.text  # the outage was seen, and ridden out


def test_a_cancelled_case_runs_jobs_are_scancelled(slurm: SlurmCluster, tmp_path, monkeypatch):
    """What the worker does when a case run is cancelled: its beams' queued and running jobs go."""
    settings = slurm_settings(tmp_path)
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "120")
    backend = make_backend(settings)
    beams = prepare_beams(settings, "SLURM-STOP", beams=2)
    jobs = [launch(backend, beam) for beam in beams]
    ids = sorted(job.queued.job_id for job in jobs)
    wait_for("both jobs to run", lambda: slurm_job(slurm, "mqi-SLURM-STOP-beam-03", "RUNNING"))
    parameters = {"case_dir": str(settings.scan_dir / "SLURM-STOP"), "config": str(settings.source)}
    assert sorted(stop_case_jobs(parameters)) == ids

    def states() -> list[str]:
        return [job["state"] for job in slurm.jobs() if job["id"] in ids]

    wait_for("both jobs cancelled", lambda: states() == ["CANCELLED"] * 2)
    assert stop_case_jobs(parameters) == []  # nothing left to stop


def test_mqi_gpus_shows_slurms_nodes_and_gpu_jobs(slurm: SlurmCluster, tmp_path, capsys):
    settings = slurm_settings(tmp_path, slurm={"partition": "gpu"})
    other = slurm.command(
        "sbatch",
        "--parsable",
        "--gres=gpu:1",
        "--job-name=someone-else",
        "--output=/dev/null",
        "--wrap=sleep 60",
    ).stdout.strip()
    try:
        wait_for("the job to run", lambda: slurm_job(slurm, "someone-else", "RUNNING"))
        assert main(["--config", str(settings.source), "gpus", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert main(["--config", str(settings.source), "gpus"]) == 0
        shown = capsys.readouterr().out
    finally:
        slurm.command("scancel", other)
    [node] = report["nodes"]
    assert (node["name"], node["partition"], node["gres"]) == (slurm.host, "gpu*", "gpu:4")
    assert node["gres_used"].startswith("gpu:1")
    assert {"job_id": other, "name": "someone-else", "state": "RUNNING"}.items() <= report["jobs"][0].items()
    assert "Slurm GPU nodes, partition gpu of Slurm via this machine" in shown and "someone-else" in shown
    assert report["queue_places"] is None and "places in Slurm's queue" not in shown  # no cap configured


def our_jobs_in_queue(slurm: SlurmCluster, prefix: str) -> int:
    """How many jobs whose name starts with `prefix` Slurm lists as pending, running or completing."""
    return sum(job["name"].startswith(prefix) and job["state"] in ACTIVE for job in slurm.jobs())


@pytest.mark.usefixtures("prefect_server")
def test_max_queued_jobs_keeps_at_most_that_many_of_our_jobs_in_slurms_queue(
    slurm: SlurmCluster, tmp_path, capsys
):
    """3 cases x 2 beams, each case an `mqi run` of its own, 4 free GPUs, slurm.max_queued_jobs 2:
    squeue never lists more than 2 of our jobs; the beams that wait say so; `mqi gpus` shows
    the places."""
    settings = slurm_settings(tmp_path, slurm={"max_queued_jobs": 2})
    launch_log = tmp_path / "launches.jsonl"
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
        "MQI_STANDIN_ENGINE_DURATION": "4",
    }
    mqi_run = [sys.executable, "-m", "deployments.cli", "--config", str(settings.source), "run"]
    cases = [small_case(settings.scan_dir, f"SLURM-CAP{k}", beams=2) for k in range(3)]
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:  # squeue every 0.1 s (a sampling interval, not a wait for anything)
        while not done.wait(0.1):
            seen.append(our_jobs_in_queue(slurm, "mqi-SLURM-CAP"))

    with ThreadPoolExecutor(1) as pool:
        sampler = pool.submit(sample)
        try:
            runs = [
                subprocess.Popen(
                    [*mqi_run, str(case)],
                    env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )
                for case in cases
            ]  # fmt: skip
            outputs = [run.communicate(timeout=300)[0] for run in runs]
        finally:
            done.set()
        sampler.result()
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    assert max(seen) == 2, seen  # the cap was reached, never passed
    starts = engine_starts(launch_log)
    assert len(starts) == 6 and most_at_once(starts) <= 2
    ours = [job for job in slurm.jobs() if job["name"].startswith("mqi-SLURM-CAP")]
    assert len(ours) == 6 and {job["state"] for job in ours} == {"COMPLETED"}  # each submitted once

    def logs() -> str:
        text = "".join(run_log(newest_case_run(f"SLURM-CAP{k}").id) for k in range(3))
        return text if "got a place in Slurm's queue after" in text else ""

    # The count is read from the server when the notice is due: a place just given back and not
    # yet taken by the waiter shows as 1/2, so any count of the two places is right.
    assert re.search(
        r"waiting for a place in Slurm's queue \([0-2]/2 taken\)",
        wait_for("the waits logged", logs, timeout=30),
    )
    assert taken_queue_places(settings) == 0 and taken_gpu_slots(settings) == {}
    capsys.readouterr()
    assert main(["--config", str(settings.source), "gpus"]) == 0
    shown = capsys.readouterr().out
    assert "our places in Slurm's queue (slurm.max_queued_jobs, limit slurm-queue-local): 0/2 taken" in shown


@pytest.mark.usefixtures("prefect_server")
def test_a_pending_jobs_progress_bar_says_why_it_waits(slurm: SlurmCluster, tmp_path, monkeypatch):
    """Other jobs hold all 4 GPUs: the bar says `Slurm job N pending: Resources (k s)` until it runs."""
    settings = slurm_settings(tmp_path)
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "6")
    blockers = other_users_jobs(slurm, tmp_path, 4)
    case_dir = small_case(settings.scan_dir, "SLURM-PEND")

    def bar() -> str:
        runs = case_runs(["SLURM-PEND"])
        texts = [a.description or "" for r in runs for a in flow_run_artifacts(r.id) if a.type == "progress"]
        return texts[0] if texts else ""

    try:
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(process_case, str(case_dir), str(settings.source), return_state=True)
            pending = wait_for(
                "the bar to say the job is pending", lambda: "pending: Resources" in bar() and bar()
            )
            job_id = slurm_job(slurm, "mqi-SLURM-PEND-beam-02", "PENDING")
            assert job_id and f"Slurm job {job_id} pending: Resources (" in pending, pending
            assert pending.startswith("beam 2 (") and pending.endswith(" s)"), pending
            slurm.command("scancel", *blockers)
            wait_for("the engine to start", lambda: launches(launch_log).get("2"))
            wait_for("the bar to show the engine's progress", lambda: bar().endswith("engine progress"))
            assert not ended(launch_log, 1)  # while the engine still runs
            state = run.result(timeout=180)
    finally:
        slurm.command("scancel", *blockers)
    assert state.is_completed(), state.message


@pytest.fixture
def slurm_sshd(slurm: SlurmCluster, tmp_path) -> Iterator[Sshd]:
    """A test sshd whose sessions see the test cluster (SetEnv SLURM_CONF): the orchestrator's login node."""
    server = Sshd(tmp_path / "sshd", env=slurm.env())
    server.start()
    yield server
    close_all()
    server.stop()


@pytest.mark.usefixtures("prefect_server")
def test_slurm_over_ssh_quotes_a_hostile_case_name_and_adopts_the_job_by_id(
    slurm: SlurmCluster, slurm_sshd: Sshd, tmp_path, monkeypatch
):
    """sbatch/squeue/sacct on the login node over SSH; the next run finds the job by its id."""
    hpc = Hpc(tmp_path / "hpc")
    name = 'it\'s "$(touch mqi-canary-ssh)" `touch mqi-canary-2`'
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "8")
    monkeypatch.chdir(tmp_path)  # where a word that escaped its quotes would touch its canary
    settings = slurm_settings(
        tmp_path, ssh={**hpc.ssh_settings(slurm_sshd), "poll_seconds": 0.2, "cleanup": "keep"}
    )
    backend = make_backend(settings)
    assert isinstance(backend, SlurmSshBackend)
    [beam] = prepare_beams(settings, name)
    job = launch(backend, beam)  # a first run's sbatch, over SSH
    assert job.dir.startswith(str(hpc.remote_root)) and job.queued and job.queued.job_id.isdigit()
    wait_for("the engine to start", lambda: launches(launch_log).get("2"))
    state = process_case(str(settings.scan_dir / name), str(settings.source), return_state=True)
    assert state.is_completed(), state.message
    assert launches(launch_log) == {"2": 1}
    log = run_log(newest_case_run(name).id)
    assert f"adopting the job running as Slurm job {job.queued.job_id} on" in log, log
    assert [j["state"] for j in slurm.jobs() if j["id"] == job.queued.job_id] == ["COMPLETED"]
    assert len([j for j in slurm.jobs() if j["name"] == job_name(beam)]) == 1  # submitted once
    assert (Path(job.dir) / "slurm.id").read_text().strip() == job.queued.job_id
    assert list(settings.output_dir(name).glob("RTDOSE_*.dcm"))
    assert not list(tmp_path.rglob("mqi-canary-*")) and not list(Path("/").glob("mqi-canary-*"))


def submitted(slurm: SlurmCluster, case_id: str) -> list[str]:
    """The ids of every job of the case Slurm was given (sbatch answered), in any state."""
    return sorted(job["id"] for job in slurm.jobs() if job["name"].startswith(f"mqi-{case_id}-"))


@pytest.mark.usefixtures("prefect_server")
def test_killed_service_run_then_retry_then_mqi_rerun_adopt_the_jobs_by_id(slurm: SlurmCluster, tmp_path):
    """The worker's flow-run process SIGKILLed while both jobs run, the UI's Retry, that attempt
    SIGKILLed too, then `mqi rerun`: each time the jobs are adopted by id (and their places in
    the capped queue taken over at once), never submitted again."""
    overrides = {
        "backend": {"kind": "slurm", "host": "slurmtest", "gpus": [0, 1, 2, 3]},
        "slurm": {"poll_seconds": 0.2, "command_timeout_seconds": 10, "max_queued_jobs": 2},
    }
    stack = Stack(tmp_path / "stack", overrides)
    stack.start()
    try:
        settings = stack.settings
        case = small_case(settings.scan_dir, "SLURM-RETRY", beams=2)
        env = {"MQI_STANDIN_ENGINE_DURATION": "45"}  # still running through two kills and restarts
        run = run_deployment(
            "process-case/case",
            parameters={"case_dir": str(case)},
            flow_run_name="SLURM-RETRY",
            job_variables={"env": env},
            timeout=0,
        )
        wait_for("both engines to start", lambda: launches(stack.launch_log) == {"2": 1, "3": 1})
        ids = submitted(slurm, "SLURM-RETRY")
        assert len(ids) == 2
        holders = settings.work_dir("SLURM-RETRY") / "beams"
        wait_for("both holders recorded", lambda: len(list(holders.glob("*/jobs/*/holder.json"))) == 2)
        with get_client(sync_client=True) as client:

            def kill_and_crash() -> None:
                os.kill(int(client.read_flow_run(run.id).infrastructure_pid), signal.SIGKILL)
                wait_for(
                    "the run to be Crashed", lambda: client.read_flow_run(run.id).state_type == "CRASHED"
                )

            kill_and_crash()
            client.set_flow_run_state(  # the UI's Retry button
                run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI")
            )
            wait_for(
                "the retried run to adopt both jobs", lambda: run_log(run.id).count("adopting the job") == 2
            )
            kill_and_crash()
        assert main(["--config", str(stack.config), "rerun", "SLURM-RETRY", "--wait"]) == 0
    finally:
        stack.stop()
    assert launches(stack.launch_log) == {"2": 1, "3": 1}  # each engine ran once
    assert submitted(slurm, "SLURM-RETRY") == ids  # sbatch'd once each
    rerun = newest_case_run("SLURM-RETRY")
    assert rerun.id != run.id and rerun.state_type == StateType.COMPLETED, rerun.state
    for flow_run_id in (run.id, rerun.id):
        log = run_log(flow_run_id)
        for job_id in ids:
            assert f"as Slurm job {job_id} " in log, log
        assert log.count("the holder of its place in Slurm's queue is gone") == 2, log
    assert taken_queue_places(settings) == 0
