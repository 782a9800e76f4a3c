"""`mqi up`: the whole service on one machine, in the foreground, until Ctrl-C.

It brings up everything that turns dropped case folders into finished runs: a Prefect
server on 127.0.0.1 (or the healthy one already at the URL), the work pool (at most
`sensor.max_running_cases` case runs at a time, the others queued) and GPU limits, the
deployments of prefect.yaml, a worker that polls every 0.5 s (Prefect's default is 10 s:
a case would wait up to 10 s for it), and a run of the file-sensor deployment. The
worker is deployments/warm_worker.py (flow runs forked from a process that has Prefect
imported: about 2 s sooner Running), or Prefect's own process worker with
`--plain-worker`. Ctrl-C (or SIGTERM) stops exactly what it started: the sensor run is
cancelled, then the process groups of the worker and of every process below it (flow
runs and the tools they run) are terminated, and the server last, so flow runs can still
report that they were interrupted. A run cut short ends Crashed; the sensor resumes it
at the next start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

from config.settings import Settings
from deployments.prefect_env import apply_server_defaults
from deployments.processes import stop_tree
from deployments.server import (
    DEFAULT_PORT,
    PREFECT_CLI,
    REPO_ROOT,
    SENSOR_DEPLOYMENT,
    SENSOR_FLOW,
    ServiceError,
    api_url,
    connected,
    deploy,
    ensure_work_pool,
    healthy,
    limit_case_queue,
    ui_url,
    work_queues,
)
from tasks.gpu.limits import ensure_gpu_limits
from tasks.gpu.pool import GpuPool

SERVER_START_SECONDS = 120  # a first start migrates the SQLite database (about 15 s here)
SENSOR_START_SECONDS = 120
CANCEL_SECONDS = 30
ACTIVE_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


class Service:
    """What `mqi up` started, so that it stops exactly that."""

    def __init__(self, settings: Settings, config: Path, api: str, worker_poll: float, warm: bool) -> None:
        self.settings = settings
        self.config = config
        self.api = api
        self.worker_poll = worker_poll
        self.warm = warm
        self.log_dir = settings.root / "logs"
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.sensor_run: UUID | None = None

    def _log(self, name: str) -> IO[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        log.write(f"\n--- mqi up {datetime.now(UTC).isoformat()} ---\n".encode())
        log.flush()
        return log

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self._log(name) as log:
            return subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start_server(self) -> None:
        """Start `prefect server start` on 127.0.0.1, its SQLite database and leases under the data root."""
        url = httpx.URL(self.api)
        if url.host not in ("127.0.0.1", "localhost") or not url.port:
            raise ServiceError(
                f"no Prefect server answers at {self.api}, and it is not a local address to start one on"
            )
        home = self.settings.root / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_HOME": str(home)}
        apply_server_defaults(env)
        argv = [PREFECT_CLI, "server", "start", "--host", "127.0.0.1", "--port", str(url.port)]
        self.server = self._spawn("server", argv, env)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not healthy(self.api):
            self.check()
            if time.monotonic() > deadline:
                raise ServiceError(f"the Prefect server did not answer within {SERVER_START_SECONDS} s")
            time.sleep(0.5)

    def start_worker(self, pool: str) -> None:
        env = {
            **os.environ,
            "PREFECT_API_URL": self.api,
            "PREFECT_WORKER_QUERY_SECONDS": f"{self.worker_poll:g}",
            "MQI_CONFIG": str(self.config),
        }
        start = (
            [sys.executable, "-m", "deployments.warm_worker"]
            if self.warm
            else [PREFECT_CLI, "worker", "start"]
        )
        self.worker = self._spawn(
            "worker", [*start, "--pool", pool, "--name", f"mqi-{socket.gethostname()}"], env
        )

    def start_sensor(self, client: SyncPrefectClient) -> FlowRun:
        """A run of the file-sensor deployment, once the worker has it Running."""
        others = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[SENSOR_FLOW])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES))
            ),
        )
        for other in others:
            print(f"warning: another file sensor run is active: {other.name} ({other.state_name})")
        run = run_deployment(SENSOR_DEPLOYMENT, timeout=0, as_subflow=False, tags=["trigger:mqi-up"])
        self.sensor_run = run.id
        deadline = time.monotonic() + SENSOR_START_SECONDS
        while run.state_type != StateType.RUNNING:
            self.check(run)
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"the file sensor run {run.name} did not start within {SENSOR_START_SECONDS} s"
                )
            time.sleep(0.5)
            run = client.read_flow_run(run.id)
        return run

    def check(self, sensor: FlowRun | None = None) -> None:
        """Raise ServiceError if a process started here has exited, or the sensor run has ended."""
        for name, process in (("worker", self.worker), ("server", self.server)):
            if process is not None and process.poll() is not None:
                log = self.log_dir / f"{name}.log"
                raise ServiceError(f"the {name} exited with code {process.returncode}; see {log}")
        if sensor is not None and sensor.state is not None and sensor.state.is_final():
            raise ServiceError(
                f"the file sensor run {sensor.name} ended {sensor.state_name}: {sensor.state.message}"
            )

    def watch(self, client: SyncPrefectClient, sensor: UUID) -> None:
        """Until interrupted: the worker, the server and the sensor run must stay alive."""
        while True:
            self.check(client.read_flow_run(sensor))
            time.sleep(2)

    def _cancel(self, client: SyncPrefectClient, run_id: UUID) -> None:
        """Cancel a run the worker is running, as the UI does, so that it ends Cancelled, not Crashed."""
        client.set_flow_run_state(run_id, Cancelling(message="stopped by mqi up"), force=True)
        deadline = time.monotonic() + CANCEL_SECONDS
        while time.monotonic() < deadline and self.worker is not None and self.worker.poll() is None:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop what was started, newest first; the server last so runs can report being interrupted.

        A second Ctrl-C is ignored meanwhile: giving up half-way would leave processes behind.
        """
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.sensor_run is not None and healthy(self.api) and self.worker is not None:
            try:
                with temporary_settings({PREFECT_API_URL: self.api}), get_client(sync_client=True) as client:
                    self._cancel(client, self.sensor_run)
            except Exception as error:  # the processes must be stopped all the same
                print(f"warning: could not cancel the file sensor run: {error}", file=sys.stderr)
        for process in (self.worker, self.server):
            if process is not None and process.poll() is None:
                stop_tree(process.pid)
                process.wait()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# SIGTERM (a service manager stopping us) is handled like Ctrl-C.
_STOP_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_interrupt}


def up(
    settings: Settings, config: Path, port: int = DEFAULT_PORT, worker_poll: float = 0.5, warm: bool = True
) -> int:
    """`mqi up`: run the whole service in the foreground until Ctrl-C."""
    api = api_url(port)
    service = Service(settings, config, api, worker_poll, warm)
    previous = {sig: signal.signal(sig, handler) for sig, handler in _STOP_SIGNALS.items()}
    settings.scan_dir.mkdir(parents=True, exist_ok=True)
    settings.engine_dir.mkdir(parents=True, exist_ok=True)
    try:
        if healthy(api):
            print(f"using the Prefect server at {api}")
        else:
            print(f"starting a Prefect server at {api} (database and logs under {settings.root})")
            service.start_server()
        with connected(api) as client:
            pools = sorted({pool for pool, _ in work_queues().values()})
            for pool in pools:
                ensure_work_pool(client, pool)
            limit_case_queue(client, settings, settings.max_running_cases())
            ensure_gpu_limits(GpuPool.of(settings.backend))
            print("deploying prefect.yaml ...")
            deploy(api)
            service.start_worker(pools[0])
            sensor = service.start_sensor(client)
            ui = ui_url(api)
            print(f"Prefect UI:  {ui}")
            print(f"scan folder: {settings.scan_dir}  (ready marker: {settings.case.ready_marker})")
            print(f"file sensor: {ui}/runs/flow-run/{sensor.id}")
            print(f"logs:        {service.log_dir}")
            print("MQI Communicator is up; Ctrl-C stops it.", flush=True)
            service.watch(client, sensor.id)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
