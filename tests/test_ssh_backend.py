"""The SSH backend against a real OpenSSH sshd on 127.0.0.1 (no mocks of the SSH layer)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from config import load_settings
from deployments.processes import process_alive
from tasks.backends import JobState, follow
from tasks.backends.base import FetchError, Holder
from tasks.backends.ssh import SshBackend
from tasks.backends.sshconn import AuthError, HostKeyError, ssh_host
from tasks.common.errors import PermanentError
from tasks.moqui.beam import TPS_NAME
from tasks.moqui.judge import dose_size_problem, judge
from tasks.moqui.tps_file import read_tps
from tests.beams import launch, launches, prepare_beams, run_beam
from tests.conftest import write_config
from tests.service_stack import wait_for
from tests.sshd import Sshd, keygen


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ssh_fingerprint(public_key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(public_key)], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def dose_name(beam) -> str:
    return beam.dose_name  # the public profile's output name holds no wildcard


def config_with(tmp_path, sshd, hpc, **ssh) -> Path:
    return write_config(tmp_path, {"backend": hpc.backend_settings(), "ssh": hpc.ssh_settings(sshd, **ssh)})


@pytest.fixture
def settings(tmp_path, sshd, hpc):
    return load_settings(config_with(tmp_path, sshd, hpc, cleanup="keep"), env={})


def test_beam_runs_in_its_job_folder_and_its_dose_comes_back_verified(settings, hpc):
    [beam] = prepare_beams(settings, "SSH-1")
    backend = SshBackend(settings)
    followed = run_beam(backend, beam, gpu=1)
    job = Path(followed.job.dir)
    assert job == hpc.remote_root / "SSH-1" / "beam-02" / beam.input_hash
    assert followed.job.state is JobState.FINISHED_OK and followed.job.gpu == 1
    verdict = judge(followed.run, followed.lines, settings.engine, settings.engine_profile)
    assert (verdict.failure, verdict.completed, verdict.beamlets) == (None, True, beam.records)

    remote_tps = read_tps(job / TPS_NAME)
    assert remote_tps["GPUID"] == "1"
    assert remote_tps["ParentDir"] == str(job / "input")  # the staged input, uploaded as it is
    assert (remote_tps["DicomDir"], remote_tps["logFilePath"]) == ("plan", "log")
    assert remote_tps["OutputDir"] == str(job / "dose")
    stage = Path(beam.stage_dir)
    here = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*"))
    assert sorted(p.relative_to(job / "input").as_posix() for p in (job / "input").rglob("*")) == here
    assert (job / "input" / "log" / "0_pad").is_dir()  # the empty folders that steer the engine too

    dose = backend.fetch(beam, followed.job)
    remote_dose = job / "dose" / dose_name(beam)
    assert dose == beam.dose_dir / dose_name(beam) and sha256(dose) == sha256(remote_dose)
    assert dose_size_problem(beam, dose, raw=True) is None
    assert not Path(f"{dose}.part").exists()

    backend.cleanup(beam, followed.job)  # policy keep: kept, marked collected
    assert job.is_dir() and (job / "collected").is_file()
    assert backend.lookup(beam).state is JobState.MISSING  # a forced rerun launches anew
    settings_delete = settings.model_copy(
        update={"ssh": settings.ssh.model_copy(update={"cleanup": "delete_on_success"})}
    )
    SshBackend(settings_delete).cleanup(beam, followed.job)
    assert not (hpc.remote_root / "SSH-1").exists()


def test_staging_resends_only_what_differs(settings):
    [beam] = prepare_beams(settings, "SSH-STAGE")
    backend = SshBackend(settings)
    backend.stage(beam)
    job = Path(backend.job_dir(beam))
    csv = next((job / "input" / "log" / "1_1G000_TX").iterdir())
    plan = next((job / "input" / "plan").iterdir())
    csv.write_text("tampered\n")
    plan_mtime = plan.stat().st_mtime_ns
    backend.stage(beam)
    assert csv.read_bytes() == (Path(beam.stage_dir) / "log" / "1_1G000_TX" / csv.name).read_bytes()
    assert plan.stat().st_mtime_ns == plan_mtime  # verified by sha256, not sent again


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_download_with_and_without_compression(tmp_path, sshd, hpc, compression):
    if compression == "zstd" and not shutil.which("zstd"):
        pytest.skip("zstd is not installed")
    settings = load_settings(config_with(tmp_path, sshd, hpc, compression=compression), env={})
    [beam] = prepare_beams(settings, f"SSH-{compression}")
    backend = SshBackend(settings)
    followed = run_beam(backend, beam)
    dose = backend.fetch(beam, followed.job)
    assert sha256(dose) == sha256(Path(followed.job.dir) / "dose" / dose_name(beam))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_corrupted_remote_output_is_detected_and_rejected(settings, damage):
    [beam] = prepare_beams(settings, "SSH-CORRUPT")
    backend = SshBackend(settings)
    followed = run_beam(backend, beam)
    remote = Path(followed.job.dir) / "dose" / dose_name(beam)
    data = bytearray(remote.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2] ^= 0xFF
    remote.write_bytes(bytes(data))
    with pytest.raises(FetchError) as error:
        backend.fetch(beam, followed.job)
    message = str(error.value)
    assert "case SSH-CORRUPT: beam 2" in message and str(remote) in message and "sha256" in message
    assert "downloaded twice" in message and "not accepted" in message
    local = beam.dose_dir / dose_name(beam)
    assert not local.exists() and not Path(f"{local}.part").exists()
    backend.reject(followed.job, message)
    found = backend.lookup(beam)
    assert found.state is JobState.FINISHED_FAILED and "rejected" in found.problem


def test_unknown_host_key_is_refused_with_its_fingerprint(tmp_path, sshd, hpc):
    known = tmp_path / "empty_known_hosts"
    known.write_text("")
    settings = load_settings(config_with(tmp_path, sshd, hpc, known_hosts=str(known)), env={})
    with pytest.raises(HostKeyError) as error:
        ssh_host(settings).run("true")
    message = str(error.value)
    assert ssh_fingerprint(sshd.root / "ssh_host_ed25519_key.pub") in message
    assert f"[127.0.0.1]:{sshd.port}" in message and "unknown" in message
    assert f"ssh-keyscan -p {sshd.port} -t ed25519 127.0.0.1 >> {known}" in message


def test_changed_host_key_is_refused_with_both_fingerprints(tmp_path, sshd, hpc):
    other = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(Path(f'{other}.pub').read_text().split()[:2])}\n")
    settings = load_settings(config_with(tmp_path, sshd, hpc, known_hosts=str(known)), env={})
    with pytest.raises(HostKeyError) as error:
        SshBackend(settings).lookup(prepare_beams(settings, "SSH-MITM")[0])
    message = str(error.value)
    assert "CHANGED" in message and "man-in-the-middle" in message
    assert ssh_fingerprint(Path(f"{other}.pub")) in message
    assert ssh_fingerprint(sshd.root / "ssh_host_ed25519_key.pub") in message
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known}" in message


HOSTILE_CASE_IDS = [
    "with space",
    'quote\'d "double"',
    "semi;touch mqi-canary-1",
    "$(touch mqi-canary-2)",
    "`touch mqi-canary-3`",
    "-rf",
    "--help",
    "ünïcødé 患者 ✓",
    "dollar$HOME&&|| >x <y *?",
]


def test_hostile_case_ids_run_nothing_else_on_the_host(tmp_path, sshd, hpc, monkeypatch):
    settings = load_settings(config_with(tmp_path, sshd, hpc, cleanup="keep"), env={})
    home = Path(os.path.expanduser("~"))
    places = [home, hpc.remote_root, hpc.engine_dir, tmp_path, Path.cwd()]
    backend = SshBackend(settings)

    def run(index: int, case_id: str) -> None:
        [beam] = prepare_beams(settings, case_id)
        followed = run_beam(backend, beam, gpu=index % 2)
        assert followed.job.state is JobState.FINISHED_OK, case_id
        assert Path(followed.job.dir).parent.parent == hpc.remote_root / case_id
        assert dose_size_problem(beam, backend.fetch(beam, followed.job), raw=True) is None, case_id

    with ThreadPoolExecutor(max_workers=4) as pool:
        for done in [pool.submit(run, i, case_id) for i, case_id in enumerate(HOSTILE_CASE_IDS)]:
            done.result()
    for place in places:
        assert not list(place.rglob("mqi-canary*")), place
        assert not (place / "x").exists()


@pytest.mark.parametrize("case_id", ["line\nbreak", "tab\tand\x7fdel", "..", "back\\slash"])
def test_case_ids_that_cannot_be_a_folder_fail_clearly(settings, case_id):
    [beam] = prepare_beams(settings, "SSH-NAME")
    bad = beam.model_copy(update={"case_id": case_id})
    with pytest.raises(PermanentError, match="cannot name a folder or file on the GPU host"):
        SshBackend(settings).lookup(bad)


def test_sshd_restart_while_polling_reconnects_without_a_second_launch(tmp_path, hpc, monkeypatch):
    sshd = Sshd(tmp_path / "own-sshd")  # its own server: this test stops it
    sshd.start()
    try:
        settings = load_settings(config_with(tmp_path, sshd, hpc), env={})
        launch_log = tmp_path / "launches.jsonl"
        monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
        monkeypatch.setenv("MQI_STANDIN_ENGINE_DURATION", "3")
        [beam] = prepare_beams(settings, "SSH-RESTART")
        backend = SshBackend(settings)
        job = launch(backend, beam)
        outcome: dict[str, object] = {}
        notes: list[str] = []

        def poll() -> None:
            try:
                outcome["followed"] = follow(
                    backend, job, backend.engine_argv(beam, 0), tmp_path / "engine.log", notify=notes.append
                )
            except Exception as error:  # reported by the assertion below
                outcome["error"] = error

        poller = threading.Thread(target=poll)
        poller.start()
        wait_for("the engine to start", lambda: launches(launch_log))
        sshd.stop()
        wait_for("the engine to finish while sshd is down", lambda: (Path(job.dir) / "exit.json").exists())
        wait_for("the poller to notice the lost connection", lambda: notes)
        sshd.start()
        poller.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        followed = outcome["followed"]
        assert followed.job.state is JobState.FINISHED_OK
        verdict = judge(followed.run, followed.lines, settings.engine, settings.engine_profile)
        assert (verdict.failure, verdict.completed) == (None, True)
        assert backend.host.connects >= 2 and "reconnecting" in notes[0]
        assert dose_size_problem(beam, backend.fetch(beam, followed.job), raw=True) is None
        assert launches(launch_log) == {"2": 1}
    finally:
        ssh_host(settings).close()
        sshd.stop()


def test_key_passphrase_from_the_environment(tmp_path, sshd, hpc, monkeypatch):
    key = keygen(tmp_path / "locked_key", passphrase="s3cret words")
    with (sshd.root / "authorized_keys").open("a") as keys:
        keys.write(Path(f"{key}.pub").read_text())
    settings = load_settings(
        config_with(tmp_path, sshd, hpc, key_file=str(key), key_passphrase_env="MQI_TEST_KEY_PASSPHRASE"),
        env={},
    )
    monkeypatch.delenv("MQI_TEST_KEY_PASSPHRASE", raising=False)
    with pytest.raises(AuthError, match="MQI_TEST_KEY_PASSPHRASE .* is not set"):
        ssh_host(settings).run("true")
    monkeypatch.setenv("MQI_TEST_KEY_PASSPHRASE", "wrong")
    with pytest.raises(AuthError, match=f"cannot load key file {key}"):
        ssh_host(settings).run("true")
    monkeypatch.setenv("MQI_TEST_KEY_PASSPHRASE", "s3cret words")
    assert ssh_host(settings).run("echo ok").stdout == b"ok\n"


def test_ssh_agent_keys_are_offered(tmp_path, sshd, hpc, monkeypatch):
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        wait_for("ssh-agent to listen", socket_path.exists)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], check=True, capture_output=True)
        settings = load_settings(config_with(tmp_path, sshd, hpc, key_file=None, allow_agent=True), env={})
        assert ssh_host(settings).run("echo agent").stdout == b"agent\n"
    finally:
        agent.terminate()
        agent.wait(timeout=30)


def test_one_connection_serves_every_beam_and_thread(settings):
    beams = prepare_beams(settings, "SSH-SHARED", beams=3)
    backend = SshBackend(settings)
    results: list[object] = []

    def one(beam, gpu: int) -> None:
        results.append(run_beam(SshBackend(settings), beam, gpu).job.state)

    threads = [threading.Thread(target=one, args=(beam, i % 2)) for i, beam in enumerate(beams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [JobState.FINISHED_OK] * 3
    assert backend.host.connects == 1


def test_stopping_a_job_on_the_host_kills_its_engine_and_marks_it_cancelled(settings, tmp_path, monkeypatch):
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    monkeypatch.setenv("MQI_STANDIN_ENGINE_FAULT", "hang")
    [beam] = prepare_beams(settings, "SSH-STOP")
    backend = SshBackend(settings)
    job = launch(backend, beam)
    wait_for("the engine to start", lambda: launches(launch_log))
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    [engine] = [record["pid"] for record in records if record["tool"] == "engine"]
    backend.hold(job, Holder(run="r", attempt=1, gpu=0, lease="l", beam=beam.label))
    [found] = backend.jobs_of_case("SSH-STOP")
    assert found.dir == job.dir and found.state is JobState.RUNNING
    assert backend.holder(found).beam == beam.label
    assert backend.stop(found, "case run SSH-STOP was cancelled") is True
    assert not process_alive(engine)
    stopped = backend.lookup(beam)
    assert stopped.state is JobState.FINISHED_FAILED
    assert stopped.problem == "it was stopped: case run SSH-STOP was cancelled"
