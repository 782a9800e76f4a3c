"""A real `prefect server start` for tests that must stop, kill or restart the server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.prefect_env import SERVER_DEFAULTS

DRAIN_SECONDS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """A Prefect server on 127.0.0.1 with the project's settings and its own PREFECT_HOME.

    `database`: a PostgreSQL URL (tests/postgres.py); default SQLite in PREFECT_HOME.
    """

    def __init__(self, home: Path, database: str | None = None) -> None:
        self.home = home
        self.database = database
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """Environment for the server and for every client process of it."""
        return {
            **os.environ,
            **SERVER_DEFAULTS,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
            **({"PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database} if self.database else {}),
        }

    def start(self, timeout: float = 120) -> None:
        prefect = Path(sys.executable).with_name("prefect")
        log = (self.home / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling the health endpoint until the server answers
        raise TimeoutError(f"prefect server did not become healthy in {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server's process group, as a crash or an OOM kill would: no clean shutdown."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@contextmanager
def pointed_at(server: LocalServer) -> Iterator[LocalServer]:
    """This process's Prefect client, and the processes it starts, use `server` for the block.

    On the way out, the logs and events queued for `server` are delivered while it is still
    up: a worker left holding them for a stopped server blocks the test harness's teardown
    (it drains every worker) for good.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_API_URL", server.api_url)
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server
            finally:
                APILogWorker.drain_all(timeout=DRAIN_SECONDS)
                EventsWorker.drain_all(timeout=DRAIN_SECONDS)
