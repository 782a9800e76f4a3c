"""The running service for benchmarks: `mqi up` on a free port with a given config, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.local_server import free_port  # noqa: E402

START_TIMEOUT = 300
T = TypeVar("T")


def wait(what: str, check: Callable[[], T], timeout: float, poll: float = 0.1) -> T:
    """Re-check until `check` returns something true; give up (exit) at the deadline."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting {timeout} s for {what}")
        time.sleep(poll)
    return value


@contextmanager
def mqi_up(
    root: Path, config: dict, options: list[str] = (), env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run `mqi up` with `config` (data root under `root`) until the block ends; yield the API URL."""
    root.mkdir(parents=True, exist_ok=True)
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump({"data_root": str(root / "data"), **config}))
    port = free_port()
    out = root / "up.out"
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    mqi = str(Path(sys.executable).with_name("mqi"))
    argv = [mqi, "--config", str(config_file), "up", "--port", str(port), *options]
    with out.open("wb") as log:
        up = subprocess.Popen(
            argv,
            env={**environment, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait("mqi up", lambda: up.poll() is not None or "is up" in out.read_text(), START_TIMEOUT, poll=0.5)
        if up.poll() is not None:
            raise SystemExit(f"mqi up exited with {up.returncode}:\n{out.read_text()}")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=120)
