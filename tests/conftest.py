"""Shared fixtures: one Prefect test server per session, and a small fast configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from config import Settings, load_settings
from tasks.backends.sshconn import close_all
from tests.sshd import SSHD, Hpc, Sshd

# A small phantom (40^3 voxels of 5 mm) keeps the stand-in engine fast in tests.
TEST_CONFIG = {
    "engine": {"poll_seconds": 0.1, "retries": 1, "retry_delay_seconds": [0.1], "timeout_seconds": 120},
    "tps": {"phantom": {"dims": [40, 40, 40], "unit_mm": [5.0, 5.0, 5.0]}},
    "backend": {"host": "test", "gpus": [0, 1]},
}


def write_config(root: Path, overrides: dict | None = None) -> Path:
    """A config file under `root` whose data root is `root/data`; `overrides` merge per section."""
    data = {"data_root": str(root / "data"), **{k: dict(v) for k, v in TEST_CONFIG.items()}}
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    for folder in ("scan", "engine"):
        (root / "data" / folder).mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def settings(config_file: Path) -> Settings:
    return load_settings(config_file, env={})


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One Prefect test server for the whole session (it takes ~13 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # it only adds "database is locked" noise
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real OpenSSH sshd on 127.0.0.1 for the session (tests/sshd.py)."""
    if not SSHD.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SSHD} is missing: .ci/run installs openssh-server")
        pytest.skip(f"{SSHD} is missing (apt-get install openssh-server)")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    close_all()
    server.stop()


@pytest.fixture
def hpc(tmp_path: Path) -> Hpc:
    """A fake GPU node (stand-in engine, fake nvidia-smi, job root) reached through `sshd`."""
    return Hpc(tmp_path / "hpc")


@pytest.fixture
def ssh_config(tmp_path: Path, sshd: Sshd, hpc: Hpc) -> Path:
    """A config whose beams run on `hpc` over SSH."""
    return write_config(tmp_path, {"backend": hpc.backend_settings(), "ssh": hpc.ssh_settings(sshd)})
