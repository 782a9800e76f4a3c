"""Whole cases over SSH on a Prefect test server: remote jobs, rejected outputs (crashes: test_faults.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from prefect.blocks.system import Secret

from config import load_settings
from flows.case import process_case
from standins.sample_case import write_sample_case
from tasks.backends import JobState
from tasks.backends.adopt import simulate_beam
from tasks.backends.ssh import SshBackend
from tasks.backends.sshconn import ssh_host
from tasks.common.errors import ToolError
from tasks.gpu.limits import ensure_gpu_limits
from tasks.gpu.pool import GpuPool
from tasks.prefect_api.secrets import secret_value
from tests.beams import launches, prepare_beams, run_beam, server_gpus
from tests.conftest import write_config
from tests.sshd import keygen
from tests.test_case_flow import dciodvfy_errors

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


def ssh_case_config(tmp_path, sshd, hpc, host: str, **ssh) -> Path:
    """Each test its own GPU host name: its GPU limits are its own on the shared server."""
    backend = {**hpc.backend_settings(), "host": host, "gpu_lease_seconds": 60}
    return write_config(tmp_path, {"backend": backend, "ssh": hpc.ssh_settings(sshd, cleanup="keep", **ssh)})


def test_whole_case_over_ssh(tmp_path, sshd, hpc, monkeypatch):
    config = ssh_case_config(tmp_path, sshd, hpc, "hpc-case")
    settings = load_settings(config, env={})
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    case_dir = write_sample_case(settings.scan_dir, "SSH CASE", beams=3)

    state = process_case(str(case_dir), str(config), return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "SSH CASE: 3/3 beams done"
    assert launches(launch_log) == {"2": 1, "3": 1, "4": 1}
    out = settings.output_dir("SSH CASE")
    for number in (2, 3, 4):
        rtdose = out / f"RTDOSE_beam{number:02d}.dcm"
        assert dciodvfy_errors(rtdose) == []
        assert pydicom.dcmread(rtdose).DoseSummationType == "BEAM"
        prov = json.loads((out / f"RTDOSE_beam{number:02d}.provenance.json").read_text())["beams"][0]
        job = Path(prov["job_dir"])
        assert prov["backend"] == "ssh" and prov["engine_command"][-1] == str(job / "moqui_tps.in")
        assert job == hpc.remote_root / "SSH CASE" / f"beam-{number:02d}" / prov["input_hash"]
        for name in ("job.json", "exit.json", "engine.log", "moqui_tps.in", "mqi-job.sh"):
            assert (job / name).is_file(), name
        assert json.loads((job / "exit.json").read_text())["exit"] == 0
        assert any((job / "input" / "plan").iterdir()) and any((job / "input" / "log").rglob("*.csv"))
        assert (job / "dose" / Path(prov["engine_output"]).name).stat().st_size == 40**3 * 8
        assert "Time taken by MC engine:" in Path(prov["engine_log"]).read_text()  # mirrored locally
    assert dciodvfy_errors(out / "RTDOSE_plan.dcm") == []


def test_corrupted_output_is_rejected_and_the_beam_relaunched(tmp_path, sshd, hpc, monkeypatch):
    config = ssh_case_config(tmp_path, sshd, hpc, "hpc-reject")
    settings = load_settings(config, env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    [beam] = prepare_beams(settings, "REJECT")
    job = run_beam(SshBackend(settings), beam).job  # a worker died after the engine ended, before the fetch
    remote = Path(job.dir) / "dose" / beam.dose_name
    data = bytearray(remote.read_bytes())
    data[100] ^= 0x01
    remote.write_bytes(bytes(data))

    with pytest.raises(ToolError, match="not what the job recorded") as error:
        simulate_beam(settings, SshBackend(settings), beam, 2, server_gpus(settings))
    assert "case REJECT: beam 2" in str(error.value)
    assert SshBackend(settings).lookup(beam).state is JobState.FINISHED_FAILED
    assert launches(launch_log) == {"2": 1}

    result, _ = simulate_beam(settings, SshBackend(settings), beam, 3, server_gpus(settings))
    assert launches(launch_log) == {"2": 2}
    assert Path(result.dose_file).read_bytes() == remote.read_bytes()


def test_a_gpu_busy_with_a_foreign_process_is_passed_over(tmp_path, sshd, hpc):
    """nvidia-smi on the node shows someone else's process on GPU 0 (its lease is free): use GPU 1."""
    hpc.set_nvidia_smi(
        "0, GPU-a, NVIDIA A100, 40960, 30000, 10960, 60, 99\n1, GPU-b, NVIDIA A100, 40960, 4, 40956, 30, 0\n",
        "31337, GPU-a, /usr/bin/python3 someone-elses-training.py, 30000\n",
    )
    settings = load_settings(ssh_case_config(tmp_path, sshd, hpc, "hpc-foreign"), env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    [beam] = prepare_beams(settings, "FOREIGN")
    result, _ = simulate_beam(settings, SshBackend(settings), beam, 1, server_gpus(settings))
    assert result.gpu == 1


def test_key_passphrase_from_a_prefect_secret_block(tmp_path, sshd, hpc):
    key = keygen(tmp_path / "locked_key", passphrase="block passphrase")
    with (sshd.root / "authorized_keys").open("a") as keys:
        keys.write(Path(f"{key}.pub").read_text())
    Secret(value="block passphrase").save("mqi-test-ssh-passphrase", overwrite=True)
    config = ssh_case_config(
        tmp_path,
        sshd,
        hpc,
        "hpc-secret",
        key_file=str(key),
        key_passphrase_secret_block="mqi-test-ssh-passphrase",
    )
    assert ssh_host(load_settings(config, env={}), secret_value).run("echo unlocked").stdout == b"unlocked\n"
