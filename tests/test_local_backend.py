"""The local backend: detached jobs with a record, so a running engine is found again, never restarted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from config import load_settings
from deployments.processes import process_alive
from tasks.backends import Job, JobState, follow
from tasks.backends.adopt import attempt_log
from tasks.backends.base import Holder, probe_script
from tasks.backends.local import LocalBackend
from tasks.common.errors import PermanentError
from tasks.moqui.judge import dose_size_problem, judge
from tests.beams import launch, launches, prepare_beams, run_beam
from tests.conftest import write_config
from tests.service_stack import wait_for


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session (a job's wrapper, timeout and engine)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6: session id
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def backend(settings) -> LocalBackend:
    return LocalBackend(settings)


def test_job_record_running_then_finished_and_found_again(backend, settings, tmp_path, monkeypatch):
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "2")
    [beam] = prepare_beams(settings, "LOCAL-1")
    assert backend.lookup(beam).state is JobState.MISSING
    job = launch(backend, beam, gpu=1)
    assert job.state is JobState.RUNNING and job.gpu == 1 and job.pid and job.timeout == 120
    assert Path(job.dir) == Path(beam.beam_dir) / "jobs" / beam.input_hash

    found = backend.lookup(beam)  # what a new flow run sees: the same job, still running
    assert found.state is JobState.RUNNING and found.pid == job.pid and found.gpu == 1
    followed = follow(backend, found, backend.engine_argv(beam, 1), tmp_path / "adopted.log")
    assert followed.job.state is JobState.FINISHED_OK and followed.job.exit_code == 0
    verdict = judge(followed.run, followed.lines, settings.engine, settings.engine_profile)
    assert (verdict.failure, verdict.completed) == (None, True)
    assert dose_size_problem(beam, backend.fetch(beam, followed.job), raw=True) is None
    assert "Time taken by MC engine:" in (tmp_path / "adopted.log").read_text()
    assert backend.lookup(beam).state is JobState.FINISHED_OK
    assert launches(launch_log) == {"2": 1}
    record = json.loads((Path(job.dir) / "job.json").read_text())
    assert record["gpu"] == 1 and record["pid"] == job.pid and record["host"]
    backend.cleanup(beam, followed.job)  # collected: a later run of these inputs is a new job
    assert backend.lookup(beam).state is JobState.MISSING


def test_engine_exceeding_its_timeout_is_killed(tmp_path, monkeypatch):
    settings = load_settings(write_config(tmp_path, {"engine": {"timeout_seconds": 1}}), env={})
    monkeypatch.setenv("MQI_STANDIN_ENGINE_FAULT", "hang")
    [beam] = prepare_beams(settings, "LOCAL-HANG")
    followed = run_beam(LocalBackend(settings), beam)
    assert followed.job.state is JobState.FINISHED_FAILED and followed.job.timed_out
    failure = judge(followed.run, followed.lines, settings.engine, settings.engine_profile).failure
    assert failure == "engine did not finish within 1 s and was killed"


def test_lost_wrapper_is_a_failed_job_and_is_launched_again(backend, settings, tmp_path, monkeypatch):
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "30")
    [beam] = prepare_beams(settings, "LOCAL-LOST")
    job = launch(backend, beam)
    wait_for("the engine to start", lambda: launches(launch_log))
    kill_session(job.pid)  # the wrapper was started with setsid: its pid is the session id
    lost = wait_for("the job to end", lambda: (j := backend.lookup(beam)).state is not JobState.RUNNING and j)
    assert lost.state is JobState.FINISHED_FAILED and lost.exit_code is None
    assert "wrapper is gone" in lost.problem

    monkeypatch.delenv("MQI_STANDIN_ENGINE_DURATION")
    followed = run_beam(backend, beam)
    assert followed.job.state is JobState.FINISHED_OK
    assert launches(launch_log) == {"2": 2}


def test_one_engine_per_gpu_even_without_leases(backend, settings, tmp_path, monkeypatch):
    """Two jobs launched on one GPU (a lease lost to a dead worker): the second waits for the first."""
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "1")
    first, second = prepare_beams(settings, "LOCAL-LOCK", beams=2)
    jobs = [launch(backend, first, gpu=0), launch(backend, second, gpu=0)]
    for beam, job in zip((first, second), jobs, strict=True):
        follow(backend, job, backend.engine_argv(beam, 0), tmp_path / f"{beam.beam_number}.log")
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    ended_first = next(r["time"] for r in records if r["event"] == "end" and r["key"] == "2")
    started_second = next(r["time"] for r in records if r["event"] == "start" and r["key"] == "3")
    assert started_second >= ended_first


def test_missing_engine_folder_or_command_is_permanent(tmp_path):
    settings = load_settings(
        write_config(tmp_path, {"engine": {"workdir": str(tmp_path / "nowhere")}}), env={}
    )
    [beam] = prepare_beams(settings, "LOCAL-NODIR")
    with pytest.raises(PermanentError, match=r"engine directory .*nowhere does not exist \(engine.workdir\)"):
        launch(LocalBackend(settings), beam)

    other = tmp_path / "other"
    other.mkdir()
    settings = load_settings(
        write_config(other, {"engine": {"command": ["/opt/no-such/tps_env", "{input}"]}}), env={}
    )
    [beam] = prepare_beams(settings, "LOCAL-NOCMD")
    with pytest.raises(PermanentError, match="cannot start the engine: '/opt/no-such/tps_env' not found"):
        launch(LocalBackend(settings), beam)


def test_engine_logs_of_a_later_run_do_not_overwrite_earlier_ones(tmp_path):
    """A rerun starts at attempt 1 again; the log a failed run's message names must survive."""
    first, retry, rerun = attempt_log(tmp_path, 1), attempt_log(tmp_path, 2), attempt_log(tmp_path, 1)
    assert [first.name, retry.name, rerun.name] == [
        "engine-attempt-1.log",
        "engine-attempt-2.log",
        "engine-attempt-1-2.log",
    ]


@pytest.mark.parametrize(
    ("before", "then", "state", "engine_ended"),
    [
        ([], "exit.json", JobState.FINISHED_OK, False),  # the job ends
        ([], "engine.ended", JobState.RUNNING, True),  # the engine exits: its GPU is free
        (["engine.ended"], "exit.json", JobState.FINISHED_OK, False),  # then it waits for the job's end
    ],
)
def test_a_waiting_probe_answers_at_the_jobs_next_step(
    backend, tmp_path, monkeypatch, before, then, state, engine_ended
):
    """follow() hears of an engine's exit and a job's end at once, not at its next poll."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    wrapper = subprocess.Popen(["sleep", "600"])  # stands for the job's wrapper while it runs
    (job_dir / "pid").write_text(f"{wrapper.pid} {Path('/proc/sys/kernel/random/boot_id').read_text()}")
    record = {"host": "here", "pid": wrapper.pid, "gpu": 0, "timeout": 120, "started": 1.0}
    (job_dir / "job.json").write_text(json.dumps(record) + "\n")
    for name in before:
        (job_dir / name).touch()
    fake_bin, watching = tmp_path / "bin", tmp_path / "watching"
    fake_bin.mkdir()
    (fake_bin / "sleep").write_text(f'#!/bin/sh\ntouch {watching}\nexec /bin/sleep "$@"\n')
    (fake_bin / "sleep").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    try:
        with ThreadPoolExecutor(1) as pool:
            probe = pool.submit(backend.probe, Job(str(job_dir), JobState.MISSING), None, 60.0)
            wait_for("the probe to watch the running job", watching.exists, timeout=30)
            (job_dir / then).write_text('{"exit": 0, "ended": 2.0}\n' if then == "exit.json" else "")
            job, _ = probe.result(timeout=30)
    finally:
        wrapper.kill()
        wrapper.wait()
    assert job.state is state and job.engine_ended is engine_ended


def test_the_gpu_is_free_when_the_engine_exits_before_the_job_ends(backend, settings, tmp_path, monkeypatch):
    """The wrapper hashes the output after the engine (seconds for a large dose): no GPU idles meanwhile."""
    fake_bin, go = tmp_path / "bin", tmp_path / "go"
    fake_bin.mkdir()
    (fake_bin / "date").write_text(  # the wrapper's last step (exit.json) waits for the test's go
        f"#!/bin/sh\n[ -f engine.ended ] && i=0 && while [ ! -f {go} ] && [ $i -lt 600 ]; "
        f'do sleep 0.05; i=$((i + 1)); done\nexec {shutil.which("date")} "$@"\n'
    )
    (fake_bin / "date").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    [beam] = prepare_beams(settings, "LOCAL-FREE")
    job = launch(backend, beam)
    seen: list[Job] = []

    def engine_ended() -> None:
        seen.append(backend.lookup(beam))
        go.touch()

    argv = backend.engine_argv(beam, 0)
    followed = follow(backend, job, argv, tmp_path / "free.log", engine_ended=engine_ended)
    assert [(j.state, j.engine_ended) for j in seen] == [(JobState.RUNNING, True)]  # once; job not over
    assert followed.job.state is JobState.FINISHED_OK and followed.job.exit_code == 0


def test_the_gpu_is_let_go_before_the_last_lines_are_consumed(backend, tmp_path, monkeypatch):
    """Consuming a line may move the progress bar (a call to a busy server): the GPU must not wait for it."""
    running = Job(str(tmp_path / "job"), JobState.RUNNING, host="h", pid=1, gpu=0, started=1.0, timeout=60.0)
    answers = iter(
        [
            (replace(running, engine_ended=True), b"Time taken by MC engine: 5.0 milli-seconds\n"),
            (replace(running, state=JobState.FINISHED_OK, exit_code=0, ended=2.0), b""),
        ]
    )
    monkeypatch.setattr(backend, "probe", lambda job, offset=None, wait=0.0: next(answers))
    order: list[str] = []
    follow(
        backend,
        running,
        ["tps_env"],
        tmp_path / "order.log",
        on_line=lambda line: order.append(line),
        engine_ended=lambda: order.append("GPU let go"),
    )
    assert order == ["GPU let go", "Time taken by MC engine: 5.0 milli-seconds"]


@pytest.mark.parametrize("poll", [0.001, 0.2, 3.0])
def test_a_waiting_probe_always_pauses(poll):
    """follow() no longer sleeps between probes, so even a tiny poll_seconds must wait a step."""
    assert "sleep 0.05" in probe_script("/jobs/x", 0, wait=poll)
    assert "sleep" not in probe_script("/jobs/x", 0)


def test_stopped_job_is_killed_marked_cancelled_and_launched_again(backend, settings, tmp_path, monkeypatch):
    """Cancel means stop: the engine's processes die, the job reads cancelled, a later launch is fresh."""
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_FAULT", "hang")
    [beam] = prepare_beams(settings, "LOCAL-STOP")
    job = launch(backend, beam, gpu=0)
    wait_for("the engine to start", lambda: launches(launch_log) == {"2": 1})
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    [engine_pid] = [r["pid"] for r in records if r["tool"] == "engine" and r["event"] == "start"]
    backend.hold(job, Holder(run="run-1", attempt=1, gpu=0, lease="lease-1"))
    assert backend.holder(job) == Holder(run="run-1", attempt=1, gpu=0, lease="lease-1")
    assert [found.dir for found in backend.jobs_of_case("LOCAL-STOP")] == [job.dir]

    assert backend.stop(job, "case run cancelled") is True
    assert not process_alive(engine_pid) and not process_alive(job.pid)
    stopped = backend.lookup(beam)
    assert stopped.state is JobState.FINISHED_FAILED
    assert stopped.problem == "it was stopped: case run cancelled"
    assert backend.stop(stopped, "again") is False  # nothing left to stop

    monkeypatch.delenv("MQI_STANDIN_ENGINE_FAULT")
    again = launch(backend, beam, gpu=0)  # the relaunch clears the old record, holder and marker
    assert backend.holder(again) is None
    followed = follow(backend, again, backend.engine_argv(beam, 0), tmp_path / "again.log")
    assert followed.job.state is JobState.FINISHED_OK
    assert backend.stop(followed.job, "too late") is False  # a finished result is kept
    assert backend.lookup(beam).state is JobState.FINISHED_OK
