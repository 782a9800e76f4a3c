"""The service's moving parts for integration tests, against the session's Prefect test server.

The repository's deployments on their work pool, a process worker and file sensors as
subprocesses, and waits on conditions read through the client, each with a deadline.
Test modules run one after the other, so one worker at a time serves the pool.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from config import load_settings
from deployments.processes import descendants, process_alive, session_members, stop_tree
from deployments.server import (
    REPO_ROOT,
    deploy,
    ensure_work_pool,
    limit_case_queue,
    work_queues,
)
from standins.sample_case import write_sample_case
from tasks.gpu.limits import ensure_slot_limits
from tests.conftest import write_config

T = TypeVar("T")
DEPLOYMENTS = ("process-case/case", "file-sensor/sensor", "gpu-monitor/gpus")
# Small and fast: a 20^3 phantom, no retries, no DICOM validator (tested elsewhere), a sensor
# that polls every 0.2 s and re-reads every file every second, incomplete cases reported after 1 s.
FAST = {
    "engine": {"poll_seconds": 0.1, "retries": 0, "retry_delay_seconds": [0.1], "timeout_seconds": 120},
    "tps": {"phantom": {"dims": [20, 20, 20], "unit_mm": [10.0, 10.0, 10.0]}},
    "backend": {"host": "sensor", "gpus": [0, 1, 2, 3]},
    "dicom": {"validator": None},
    "sensor": {"poll_seconds": 0.2, "rescan_seconds": 1, "incomplete_report_seconds": 1},
}


CASES_AT_ONCE = 4  # two cores: more case processes at once only fight for the CPU and the database


def without_privileges() -> list[str]:
    """A command prefix under which root obeys file modes (it drops the capabilities to
    read and write any file); empty when not root, where file modes already bite.
    """
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def wait_for(what: str, check: Callable[[], T], timeout: float = 180) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.3)
    return value


def small_case(parent: Path, case_id: str, beams: int = 1, **options: object) -> Path:
    """A sample case that runs in seconds: two energy layers of four spots per beam."""
    return write_sample_case(parent, case_id, beams=beams, layers=2, spots_per_layer=4, **options)


def case_runs(names: list[str]) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["process-case"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)),
        )


def finished(names: list[str], count: int | None = None) -> list[FlowRun] | None:
    """The runs of these cases once there are `count` (default: one per name), all in a final state."""
    runs = case_runs(names)
    if len(runs) == (len(names) if count is None else count) and all(
        run.state is not None and run.state.is_final() for run in runs
    ):
        return runs
    return None


def run_log(run_id: UUID) -> str:
    """Every log line of a flow run and its tasks, as the UI shows them."""
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
    return "\n".join(log.message for log in logs)


def events(name: str, resource_id: str) -> list:
    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id])),
            limit=50,  # the server's maximum (the client's default of 100 is refused)
        )
    return page.events


class Stack:
    """The repository's deployments, and the warm process worker polling their pool."""

    def __init__(self, root: Path, overrides: dict | None = None, prefix: list[str] | None = None) -> None:
        """`overrides` replace keys of FAST per section (e.g. an ssh: section and its backend)."""
        self.root = root
        self.prefix = prefix or []  # before every command it starts (see `without_privileges`)
        self.api = str(PREFECT_API_URL.value())
        [self.pool] = {pool for pool, _ in work_queues().values()}
        sections = {**FAST, **(overrides or {})}
        self.config = write_config(
            root, {name: {**FAST.get(name, {}), **(overrides or {}).get(name, {})} for name in sections}
        )
        self.settings = load_settings(self.config, env={})
        self.launch_log = root / "launches.jsonl"
        self.worker: subprocess.Popen[bytes] | None = None
        self.sensors: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PREFECT_API_URL": self.api,
            "MQI_CONFIG": str(self.config),
            "MQI_STANDIN_LAUNCH_LOG": str(self.launch_log),
        }

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [*self.prefix, *argv],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> None:
        with get_client(sync_client=True) as client:
            ensure_work_pool(client, self.pool)
            limit_case_queue(client, self.settings, CASES_AT_ONCE)
        ensure_slot_limits(self.settings)  # as `mqi up` does; every test config uses these GPUs
        deploy(self.api)
        env = {**self.env(), "PREFECT_WORKER_QUERY_SECONDS": "0.5"}
        argv = [sys.executable, "-m", "deployments.warm_worker", "--pool", self.pool]  # as `mqi up` starts it
        self.worker = self._spawn("worker", argv, env)

    def start_sensor(self, config: Path) -> subprocess.Popen[bytes]:
        """The sensor flow in a process of its own, as a restartable stand-in for its deployment run."""
        code = f"from flows.sensor import file_sensor; file_sensor(config={str(config)!r})"
        sensor = self._spawn("sensor", [sys.executable, "-c", code], self.env())
        self.sensors.append(sensor)
        return sensor

    def stop(self) -> None:
        for process in [*self.sensors, self.worker]:
            if process is not None and process.poll() is None:
                stop_tree(process.pid)
                process.wait()
        remove_deployments()


def running_stack(
    tmp_path_factory: pytest.TempPathFactory, prefix: list[str] | None = None
) -> Iterator[Stack]:
    """Body of a module-scoped `stack` fixture: started before the module's tests, stopped after."""
    stack = Stack(tmp_path_factory.mktemp("stack"), prefix=prefix)
    stack.start()
    yield stack
    stack.stop()


def remove_deployments() -> None:
    """Delete the repository's deployments (and with them the GPU monitor's scheduled runs)."""
    with get_client(sync_client=True) as client:
        for name in DEPLOYMENTS:
            try:
                client.delete_deployment(client.read_deployment_by_name(name).id)
            except ObjectNotFound:
                continue


class Up:
    """`mqi up` as an operator runs it, in a session of its own, its output in a file."""

    def __init__(self, root: Path, settings_config: Path, env: dict[str, str]) -> None:
        self.root, self.config, self.env = root, settings_config, env
        self.process: subprocess.Popen[bytes] | None = None
        self.out = root / "up.out"
        self.started: set[int] = set()  # every process seen below it or in its session

    def start(self, ready: str = "is up") -> None:
        """Start it and wait until its output says `ready` (by default, that it is up)."""
        mqi = os.path.join(os.path.dirname(sys.executable), "mqi")
        mark = self.out.stat().st_size if self.out.exists() else 0
        with self.out.open("ab") as log:
            self.process = subprocess.Popen(
                [mqi, "--config", str(self.config), "up"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        said = lambda: self.process.poll() is not None or ready in self.text(mark)  # noqa: E731
        wait_for(f"mqi up to say {ready!r}", said)
        assert self.process.poll() is None, self.text()

    def text(self, since: int = 0) -> str:
        return self.out.read_bytes()[since:].decode(errors="replace")

    def look(self) -> set[int]:
        """Remember every process of the service now (its own, the worker's session, ...)."""
        assert self.process is not None
        now = {*descendants(self.process.pid), *session_members(self.process.pid)}
        for pid in list(now):
            now |= set(session_members(pid))  # the worker's and the server's sessions
        self.started |= now
        return now

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.process is not None
        self.look()
        self.process.send_signal(sig)
        return self.process.wait(timeout=120)

    def process_with(self, marker: bytes) -> int:
        """The one process of the service whose command line holds `marker` (e.g. b"warm_worker")."""
        found = []
        for pid in self.look():
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:  # it ended since the look
                continue
        [pid] = found
        return pid

    def left_running(self, keep: set[int]) -> list[int]:
        return [pid for pid in self.started - keep if process_alive(pid)]

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_tree(self.process.pid)
            self.process.wait()


def engines_alive(launch_log: Path) -> set[int]:
    """Pids of the engine launches that have started and not ended (the detached jobs)."""
    starts, ends = set(), set()
    for line in launch_log.read_text().splitlines() if launch_log.exists() else []:
        record = json.loads(line)
        if record["tool"] == "engine":
            (starts if record["event"] == "start" else ends).add(record["pid"])
    return {pid for pid in starts - ends if process_alive(pid)}
