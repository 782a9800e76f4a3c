"""GPU discovery: nvidia-smi's CSV parsed robustly, asked locally or over SSH, shown by `mqi gpus`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from config import load_settings
from deployments.cli import main
from tasks.backends.local import LocalBackend
from tasks.gpu.broker import gpu_lease
from tasks.gpu.limits import ensure_gpu_limits, gpu_status
from tasks.gpu.nvidia_smi import (
    BusyGpus,
    GpuQueryError,
    backend_runner,
    gpu_report,
    parse_gpus,
    parse_processes,
    query_gpus,
)
from tasks.gpu.pool import GpuPool
from tests.conftest import write_config
from tests.service_stack import wait_for
from tests.sshd import FIXTURES

GPUS = (
    "0, GPU-aaa, NVIDIA A100-SXM4-40GB, 40960, 1024, 39936, 41, 87\n"
    "1, GPU-bbb, NVIDIA A100, PCIe, 40GB, 40960, [N/A], N/A, [N/A], [Not Supported]\n"
    "2, GPU-ccc, Tesla V100\n"
    "garbage without an index\n"
)
APPS = (
    "4242, GPU-aaa, /opt/moqui/tps_env, 2048\n"
    "777, GPU-aaa, python, with, commas, N/A\n"
    "[N/A], GPU-ccc, [N/A], [N/A]\n"
)


def fake_nvidia_smi(folder: Path, gpus: str, apps: str = "", exit_code: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpus.csv").write_text(gpus)
    (folder / "apps.csv").write_text(apps)
    if exit_code is not None:
        (folder / "exit_code").write_text(str(exit_code))
    return folder


@pytest.fixture
def local(tmp_path, monkeypatch) -> LocalBackend:
    """The local backend with the fake nvidia-smi answering from tmp_path/smi."""
    monkeypatch.setenv("FAKE_NVIDIA_SMI_DIR", str(tmp_path / "smi"))
    config = write_config(tmp_path, {"backend": {"nvidia_smi": ["sh", str(FIXTURES / "nvidia-smi")]}})
    return LocalBackend(load_settings(config, env={}))


def test_parse_gpus_with_not_available_missing_fields_and_commas():
    gpus, problems = parse_gpus(GPUS)
    assert [g.index for g in gpus] == [0, 1, 2]
    assert gpus[0].memory_free_mib == 39936 and gpus[0].temperature_c == 41 and gpus[0].utilization_pct == 87
    assert gpus[1].name == "NVIDIA A100, PCIe, 40GB" and gpus[1].memory_total_mib == 40960
    assert gpus[1].memory_used_mib is None and gpus[1].utilization_pct is None
    assert gpus[2].name == "Tesla V100" and gpus[2].memory_total_mib is None
    assert problems == ["GPU line without an index: 'garbage without an index'"]


def test_parse_processes_with_commas_and_not_available():
    found = parse_processes(APPS)
    assert [(p.pid, p.gpu_uuid, p.name, p.used_memory_mib) for p in found] == [
        (4242, "GPU-aaa", "/opt/moqui/tps_env", 2048),
        (777, "GPU-aaa", "python, with, commas", None),
        (None, "GPU-ccc", "", None),
    ]
    assert parse_processes("No running processes found\n") == []


def test_query_attaches_processes_to_their_gpu(local, tmp_path):
    fake_nvidia_smi(tmp_path / "smi", GPUS, APPS)
    report = query_gpus(backend_runner(local), local.settings.backend.nvidia_smi, local.where)
    assert [len(g.processes) for g in report.gpus] == [2, 0, 1]
    assert report.gpus[0].processes[0].name == "/opt/moqui/tps_env"


def test_no_gpus_is_an_empty_report(local, tmp_path):
    fake_nvidia_smi(tmp_path / "smi", "No devices were found\n", exit_code=6)
    report = gpu_report(local.settings)
    assert report.gpus == [] and report.problems == []


def test_missing_command_and_driver_failure_are_clear_errors(tmp_path, local):
    settings = load_settings(
        local.settings.source, env={"MQI__BACKEND__NVIDIA_SMI": "[/opt/none/nvidia-smi]"}
    )
    with pytest.raises(GpuQueryError, match=r"nvidia-smi not found on this machine .*/opt/none/nvidia-smi"):
        gpu_report(settings)
    driver = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    fake_nvidia_smi(tmp_path / "smi", driver, exit_code=9)
    with pytest.raises(GpuQueryError, match="exit 9.*couldn't communicate with the NVIDIA driver"):
        gpu_report(local.settings)


def test_gpu_report_over_ssh(ssh_config, hpc, sshd):
    hpc.set_nvidia_smi(GPUS, APPS)
    report = gpu_report(load_settings(ssh_config, env={}))
    assert report.where.startswith("host ") and report.where.endswith(f"@127.0.0.1:{sshd.port}")
    assert [g.index for g in report.gpus] == [0, 1, 2]
    assert [p.pid for p in report.gpus[0].processes] == [4242, 777]


def test_gpus_with_foreign_processes_or_too_little_memory_are_skipped(local, tmp_path):
    fake_nvidia_smi(tmp_path / "smi", GPUS + "3, GPU-ddd, NVIDIA A100, 40960, 39000, 1960, 30, 0\n", APPS)
    skip = BusyGpus(backend_runner(local), local.settings.backend.nvidia_smi, local.where, min_free_mib=2048)
    assert "pid 4242 /opt/moqui/tps_env (2048 MiB)" in skip(0)
    assert skip(1) is None  # free memory N/A: not known to be too full
    assert skip(3) == "only 1960 MiB free, below backend.min_free_memory_mib (2048 MiB)"
    assert skip(7) is None  # not listed by nvidia-smi: the leases alone decide
    missing = BusyGpus(backend_runner(local), ["/opt/none/nvidia-smi"], local.where)
    assert missing(0) is None  # no nvidia-smi view: the leases alone decide


def test_mqi_gpus_command(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("FAKE_NVIDIA_SMI_DIR", str(fake_nvidia_smi(tmp_path / "smi", GPUS, APPS)))
    config = write_config(tmp_path, {"backend": {"nvidia_smi": ["sh", str(FIXTURES / "nvidia-smi")]}})
    assert main(["--config", str(config), "gpus"]) == 0
    out = capsys.readouterr()  # a table (rich wraps it to the test's 80 columns)
    assert out.out.startswith("GPUs on this machine") and "A100" in out.out
    assert "GPU line without an index" in out.err
    assert main(["--config", str(config), "gpus", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["index"] for g in data["gpus"]] == [0, 1, 2] and data["gpus"][0]["processes"][0]["pid"] == 4242

    monkeypatch.setenv("MQI__BACKEND__NVIDIA_SMI", "[/opt/none/nvidia-smi]")
    nowhere = "http://127.0.0.1:9/api"  # no server there either (another may answer on 4200)
    assert main(["--config", str(config), "gpus", "--api", nowhere]) == 1
    assert "nvidia-smi not found" in capsys.readouterr().err


@pytest.mark.integration
def test_mqi_gpus_without_nvidia_smi_shows_the_lease_table_of_the_server_it_is_given(
    prefect_server, tmp_path, monkeypatch, capsys
):
    config = write_config(
        tmp_path, {"backend": {"host": "nosmi", "gpus": [0, 1], "nvidia_smi": ["/opt/none/nvidia-smi"]}}
    )
    pool = GpuPool.of(load_settings(config, env={}).backend)
    ensure_gpu_limits(pool)
    api = str(PREFECT_API_URL.value())
    with gpu_lease(pool, who={"case_id": "P2", "beam": "beam 4 (3G180:TX)", "beam_number": "4"}) as lease:
        # who holds a GPU comes from its lease event, which the server stores a moment after it is sent
        wait_for("the lease event to be stored", lambda: any(row["case"] == "P2" for row in gpu_status(pool)))
        assert main(["--config", str(config), "gpus", "--api", api]) == 0
        out = capsys.readouterr()
        assert "GPU leases on nosmi" in out.out and "1/2 leased: P2 beam 4" in out.out
        assert f"gpu-nosmi-{lease.index}" in out.out and "nvidia-smi not found" in out.err
        assert main(["--config", str(config), "gpus", "--api", api, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        states = {row["gpu"]: row["state"] for row in data["leases"]}
        assert states == {lease.index: "leased", 1 - lease.index: "free"}
    assert main(["--config", str(config), "gpus", "--api", "http://127.0.0.1:9/api"]) == 1  # neither half
    assert "no Prefect server answers at http://127.0.0.1:9/api" in capsys.readouterr().err
