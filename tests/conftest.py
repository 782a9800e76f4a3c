"""Shared fixtures: one Prefect test server per session, and a small fast configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from config import Settings, load_settings
from tasks.backends.sshconn import close_all
from tests.browser import Browser, chromium
from tests.local_server import LocalServer, pointed_at
from tests.postgres import Postgres
from tests.postgres import available as postgres_available
from tests.slurm import SlurmCluster, missing
from tests.sshd import SSHD, Hpc, Sshd

# The server databases the tests that matter run against (parametrised: `on_database`).
DATABASES = ["sqlite", "postgres"]

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
    root.mkdir(parents=True, exist_ok=True)
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
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL 15 (initdb + pg_ctl in a temporary folder) for the whole session."""
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL 15 is missing: .ci/run installs postgresql")
        pytest.skip("PostgreSQL 15 is missing (apt-get install postgresql)")
    database = Postgres()
    database.init()
    database.start()
    yield database
    database.remove()


@pytest.fixture(scope="session")
def postgres_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """One real `prefect server start` on `postgres` for the whole session."""
    server = LocalServer(tmp_path_factory.mktemp("prefect-pg-home"), postgres.create_database("prefect"))
    try:
        server.start(timeout=240)  # a new database is migrated first
        yield server
    finally:
        server.stop()


@contextmanager
def on_database(request: pytest.FixtureRequest, database: str) -> Iterator[None]:
    """The session's Prefect server on `database` ("sqlite": the test harness; "postgres"), for the block."""
    if database == "sqlite":
        request.getfixturevalue("prefect_server")
        yield
    else:
        with pointed_at(request.getfixturevalue("postgres_server")):
            yield


@pytest.fixture(params=DATABASES)
def either_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test runs twice: on the session's SQLite server and on its PostgreSQL one."""
    with on_database(request, request.param):
        yield request.param


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
def browser() -> Iterator[Browser]:
    """Headless Chromium (tests/browser.py), for tests marked `browser`."""
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    with Browser() as opened:
        yield opened


@pytest.fixture
def hpc(tmp_path: Path) -> Hpc:
    """A fake GPU node (stand-in engine, fake nvidia-smi, job root) reached through `sshd`."""
    return Hpc(tmp_path / "hpc")


@pytest.fixture
def ssh_config(tmp_path: Path, sshd: Sshd, hpc: Hpc) -> Path:
    """A config whose beams run on `hpc` over SSH."""
    return write_config(tmp_path, {"backend": hpc.backend_settings(), "ssh": hpc.ssh_settings(sshd)})


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real single-node Slurm with 4 fake GPUs for the session (tests/slurm.py); SLURM_CONF points at it."""
    absent = missing()
    if absent or os.geteuid() != 0:
        why = f"{', '.join(absent)} missing" if absent else "slurmd must run as root"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run installs slurmctld slurmd slurm-client munge")
        pytest.skip(f"{why} (apt-get install slurmctld slurmd slurm-client munge)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env())  # this process and every flow-run process it starts
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


# The test files that take minutes each (real services, several runs of `mqi up`), started first
# so that under `--dist loadfile` (.ci/run) no worker is left with one of them at the end.
LONG_FILES = (
    "test_slurm.py",
    "test_service_faults.py",
    "test_several_machines.py",
    "test_cluster.py",
    "test_faults.py",
    "test_case_runs.py",
    "test_sensor.py",
    "test_ssh_case.py",
    "test_real_tools.py",
    "test_ui.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long files first, in LONG_FILES order; the rest as collected (the order within a file kept)."""
    rank = {name: index for index, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
