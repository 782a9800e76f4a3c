"""`mqi up`: the whole service on one machine, in the foreground, until Ctrl-C.

It brings up everything that turns dropped case folders into finished runs: a Prefect
server on 127.0.0.1 (or the healthy one already at the URL), the work pool (at most
`sensor.max_running_cases` case runs at a time, the others queued) and GPU limits, the
deployments of prefect.yaml, a worker that polls every 0.5 s (Prefect's default is 10 s:
a case would wait up to 10 s for it), and a run of the file-sensor deployment. The
worker is deployments/warm_worker.py (flow runs forked from a process that has Prefect
imported: about 2 s sooner Running), or Prefect's own process worker with
`--plain-worker`. It also starts the GPU monitor (one run, the table of GPU leases) and,
every few seconds, stops the engine jobs of case runs that were cancelled without their
worker's help (deployments/cancel.py). Ctrl-C (or SIGTERM) stops exactly what it started:
the sensor and monitor runs are cancelled, then the process groups of the worker and of
every process below it (flow runs and the tools they run) are terminated, and the server
last, so flow runs can still report that they were interrupted. A run cut short ends
Crashed; the sensor resumes it at the next start.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import IO, TypeVar
from uuid import UUID, uuid4

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled, Cancelling

from config.settings import Settings
from deployments.cancel import Reconciler
from deployments.cluster import (
    SILENCE_SECONDS,
    check_shared_paths,
    database_env,
    ensure_crash_automations,
    ensure_result_storage,
    record_shared_paths,
    worker_env,
)
from deployments.notify import ensure_notifications
from deployments.prefect_env import apply_server_defaults, own_address
from deployments.processes import process_alive, session_members, stop_tree
from deployments.server import (
    MONITOR_DEPLOYMENT,
    MONITOR_FLOW,
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
from deployments.stranded import crash_never_started, crash_stranded
from tasks.gpu.limits import ensure_slot_limits
from tasks.prefect_api.client import server_unavailable

# A first start migrates the database: about 15 s on SQLite, 36 s on PostgreSQL, and 140 s
# on PostgreSQL on a 2-core host at load 20 (measured).
SERVER_START_SECONDS = 300
SENSOR_START_SECONDS = 120
CANCEL_SECONDS = 30
WATCH_SECONDS = 2.0  # how often `mqi up` looks at its processes, the server and stranded runs
RESTARTS_ALLOWED = 3  # restarts of the server or the worker within RESTART_WINDOW_SECONDS
RESTART_WINDOW_SECONDS = 300
SERVER_BUSY_SECONDS = 300  # how long a step of `mqi up` waits out a server that is busy or restarting
# A GPU monitor run cancelled because the deployment's one place is held while no run is active
# (a killed run's slot lease, which Prefect frees when it expires: up to 300 s): the next one
# is started after this pause, doubled each time up to the most.
MONITOR_PAUSE_SECONDS = 15.0
MONITOR_PAUSE_MOST_SECONDS = 120.0
PLACE_HELD = "Deployment concurrency limit reached."  # Prefect's message on such a cancelled run
ACTIVE_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


T = TypeVar("T")


class Service:
    """What `mqi up` started, so that it stops exactly that."""

    def __init__(
        self,
        settings: Settings,
        config: Path,
        api: str,
        worker_poll: float,
        warm: bool,
        host: str = "127.0.0.1",
    ) -> None:
        self.settings = settings
        self.host = host
        self.config = config
        self.api = api
        self.worker_poll = worker_poll
        self.warm = warm
        self.log_dir = settings.root / "logs"
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.sensor_run: UUID | None = None
        self.pool, self.queues = "", []
        self.seen_pids: set[int] = set()  # the worker's processes (flow runs among them), ever
        self.alive_pids: set[int] = set()  # those alive at the last look
        self.restarts: list[float] = []
        self.server_lost: float | None = None  # since when the server does not answer
        self.monitor_run: UUID | None = None  # the GPU monitor run it started, or one it watches
        self.monitor_owned = False  # whether it started that run (and so stops it)
        self.monitor_pause = 0.0  # the pause before the next monitor run, while its place is held
        self.monitor_paused_until: float | None = None
        self.reconciler = Reconciler(settings, say=lambda message: print(message, flush=True))

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
        """Start `prefect server start` on `host`, its database (SQLite, or server.database) and leases
        under the data root."""
        url = httpx.URL(self.api)
        if url.host not in ("127.0.0.1", "localhost") or not url.port:
            raise ServiceError(
                f"no Prefect server answers at {self.api}, and it is not a local address to start one on"
            )
        home = self.settings.root / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            **own_address(url.port),
            **database_env(self.settings, dict(os.environ)),
        }
        apply_server_defaults(env)
        argv = [PREFECT_CLI, "server", "start", "--host", self.host, "--port", str(url.port)]
        self.server = self._spawn("server", argv, env)
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not healthy(self.api):
            self.check()
            if time.monotonic() > deadline:
                raise ServiceError(f"the Prefect server did not answer within {SERVER_START_SECONDS} s")
            time.sleep(0.5)

    def start_worker(self, pool: str, queues: Sequence[str] = ()) -> None:
        """The worker of this machine, on every queue of `pool` or only on `queues`."""
        self.pool, self.queues = pool, list(queues)
        env = {
            **os.environ,
            "PREFECT_API_URL": self.api,
            "PREFECT_WORKER_QUERY_SECONDS": f"{self.worker_poll:g}",
            "MQI_CONFIG": str(self.config),
            **worker_env(),
        }
        start = (
            [sys.executable, "-m", "deployments.warm_worker"]
            if self.warm
            else [PREFECT_CLI, "worker", "start"]
        )
        self.worker = self._spawn(
            "worker",
            [*start, "--pool", pool, "--name", f"mqi-{self.settings.machine}"]
            + [arg for queue in queues for arg in ("--work-queue", queue)],
            env,
        )

    def start_sensor(self, client: SyncPrefectClient) -> FlowRun:
        """A run of the file-sensor deployment, once the worker has it Running."""
        what = "starting the file sensor"
        others = patiently(
            what,
            lambda: client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[SENSOR_FLOW])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES))
                ),
            ),
        )
        for other in others:
            print(f"warning: another file sensor run is active: {other.name} ({other.state_name})")
        run = start_run(what, SENSOR_DEPLOYMENT)
        self.sensor_run = run.id
        deadline = time.monotonic() + SENSOR_START_SECONDS
        while run.state_type != StateType.RUNNING:
            self.check(run)
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"the file sensor run {run.name} did not start within {SENSOR_START_SECONDS} s"
                )
            time.sleep(0.5)
            run = patiently(what, partial(client.read_flow_run, run.id))
        return run

    def start_monitor(self) -> None:
        """A run of the GPU monitor deployment (the table of GPU leases), until stopped."""
        self.monitor_run = start_run("starting the GPU monitor", MONITOR_DEPLOYMENT).id
        self.monitor_owned = True

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

    def _restart(self, name: str, process: subprocess.Popen[bytes]) -> None:
        """Say that a child exited; give up if it keeps exiting (RESTARTS_ALLOWED in RESTART_WINDOW s)."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_SECONDS] + [now]
        log = self.log_dir / f"{name}.log"
        if len(self.restarts) > RESTARTS_ALLOWED:
            raise ServiceError(
                f"the {name} exited with code {process.returncode} (see {log}), the "
                f"{len(self.restarts)}th restart in {RESTART_WINDOW_SECONDS} s; giving up"
            )
        print(f"the {name} exited with code {process.returncode} (see {log}); starting it again", flush=True)

    def _server_down(self, error: Exception) -> None:
        """The server does not answer: say so once, with the time, and wait for it."""
        if self.server_lost is None:
            self.server_lost = time.monotonic()
            print(
                f"the Prefect server at {self.api} does not answer ({why_unavailable(error)}); waiting for "
                "it. Case runs on their way may crash; their engine jobs go on, and crashed runs are "
                "resumed once it is back.",
                flush=True,
            )

    def _supervise(self, client: SyncPrefectClient) -> None:
        """One look: restart a dead server or worker, reconcile stranded runs, keep a sensor running."""
        if self.server is not None and self.server.poll() is not None:
            self._restart("server", self.server)
            self.start_server()
        if self.worker is not None and self.worker.poll() is not None:
            self._restart("worker", self.worker)
            stop_tree(self.worker.pid)  # what it left: the fork server, flow runs, the sensor
            self.start_worker(self.pool, self.queues)
        alive = set(session_members(self.worker.pid)) if self.worker is not None else set()
        # A process of a worker stopped just now may take a moment to end: it ends in a later look.
        alive |= {pid for pid in self.alive_pids if process_alive(pid)}
        ended = self.alive_pids - alive  # processes of the worker's that ended since the last look
        self.seen_pids |= alive
        try:
            sensor, monitor = self._read_own_runs(client)
            if ended or self.server_lost is not None:
                for run in crash_stranded(client, self.seen_pids):
                    print(f"run {run.name} ({run.id}): {run.state.message}", flush=True)
        except Exception as error:
            if not server_unavailable(error):
                raise
            self._server_down(error)
            return
        self.alive_pids = alive
        if self.reconciler.due():  # the engine jobs of case runs that are over (deployments/cancel.py)
            try:
                self.reconciler.reconcile(client)
                if self.sensor_run is not None:  # the machine whose sensor resumes crashed runs
                    for run in crash_never_started(client, SILENCE_SECONDS):
                        print(f"run {run.name} ({run.id}): {run.state.message}", flush=True)
            except Exception as error:  # the server is busy or restarting: next time
                print(f"warning: looking for case runs to stop or resume failed: {error}", flush=True)
        if self.server_lost is not None:
            print(
                f"the Prefect server answers again, after {time.monotonic() - self.server_lost:.0f} s",
                flush=True,
            )
            self.server_lost = None
        if sensor is not None and sensor.state is not None and sensor.state.is_final():
            if sensor.state_type != StateType.CRASHED:  # Cancelled by a person, or failed: say it, stop
                self.check(sensor)
            print(f"the file sensor run {sensor.name} crashed ({sensor.state.message}); starting a new one")
            self.start_sensor(client)
        if monitor is not None and monitor.state is not None and monitor.state.is_final():
            self._replace_monitor(client, monitor)
        elif monitor is not None and monitor.state_type == StateType.RUNNING:
            self.monitor_pause = 0.0

    def _read_own_runs(self, client: SyncPrefectClient) -> tuple[FlowRun | None, FlowRun | None]:
        """The sensor run and the monitor run this service watches, in one read (one every look).

        A watched run that is not on the server any more (deleted in the UI) is replaced.
        """
        ids = [run for run in (self.sensor_run, self.monitor_run) if run is not None]
        found = (
            client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))) if ids else []
        )
        runs = {run.id: run for run in found}
        if self.sensor_run is not None and self.sensor_run not in runs:
            print(f"the file sensor run {self.sensor_run} is gone from the server; starting a new one")
            self.start_sensor(client)
        if self.monitor_run is not None and self.monitor_run not in runs:
            print(f"the GPU monitor run {self.monitor_run} is gone from the server; starting a new one")
            self.start_monitor()
        sensor = runs.get(self.sensor_run) if self.sensor_run is not None else None
        return sensor, runs.get(self.monitor_run) if self.monitor_run is not None else None

    def _replace_monitor(self, client: SyncPrefectClient, ended: FlowRun) -> None:
        """The GPU monitor run `ended`: watch another one that is active, else start one.

        The monitor deployment allows one run at a time and cancels a new one while another
        holds its place (another `mqi up` on this server, or a run whose process was killed
        until it is marked Crashed): starting a new one at every look would flood the run list.
        When no run holds it (a killed run's slot lease, until it expires), the next one is
        started after a pause that doubles each time.
        """
        now = time.monotonic()
        if self.monitor_paused_until is not None and now < self.monitor_paused_until:
            return
        holding = FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING])
        others = patiently(
            "replacing the GPU monitor",
            partial(
                client.read_flow_runs,
                flow_filter=FlowFilter(name=FlowFilterName(any_=[MONITOR_FLOW])),
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(not_any_=[ended.id]), state=FlowRunFilterState(type=holding)
                ),
                limit=1,
            ),
        )
        if others:
            other = others[0]
            print(f"another GPU monitor run is active ({other.name}, {other.state_name}); watching it")
            self.monitor_run, self.monitor_owned = other.id, False
            return
        held = ended.state is not None and ended.state.message == PLACE_HELD
        if held and self.monitor_paused_until is None:
            pause = min(2 * self.monitor_pause, MONITOR_PAUSE_MOST_SECONDS) or MONITOR_PAUSE_SECONDS
            self.monitor_pause, self.monitor_paused_until = pause, now + pause
            print(
                f"the GPU monitor run {ended.name} was cancelled: the deployment's one place is held, "
                f"by no active run (a stopped run's lease, until it expires); trying again in {pause:.0f} s",
                flush=True,
            )
            return
        self.monitor_paused_until = None
        print(f"the GPU monitor run ended {ended.state_name}; starting a new one", flush=True)
        self.start_monitor()

    def watch(self, client: SyncPrefectClient) -> None:
        """Until interrupted: keep the server, the worker and a sensor run alive."""
        while True:
            self._supervise(client)
            time.sleep(WATCH_SECONDS)

    def _cancel(self, client: SyncPrefectClient, run_id: UUID) -> None:
        """Cancel a run the worker is running, as the UI does, so that it ends Cancelled, not Crashed.

        One that no worker has picked up yet is Cancelled at once.
        """
        if client.read_flow_run(run_id).state_type == StateType.SCHEDULED:
            client.set_flow_run_state(run_id, Cancelled(message="stopped by mqi up before it ran"))
            return
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
        monitor = self.monitor_run if self.monitor_owned else None  # another service's is not ours to stop
        for name, run in (("GPU monitor", monitor), ("file sensor", self.sensor_run)):
            if run is None or not healthy(self.api) or self.worker is None:
                continue
            try:
                with temporary_settings({PREFECT_API_URL: self.api}), get_client(sync_client=True) as client:
                    self._cancel(client, run)
            except Exception as error:  # the processes must be stopped all the same
                print(f"warning: could not cancel the {name} run: {error}", file=sys.stderr)
        if self.worker is not None:
            seen = self.seen_pids | set(session_members(self.worker.pid))
            stop_tree(self.worker.pid)  # its whole session: also what a dead worker left behind
            self.worker.wait()
            self._crash_stranded(seen)
        if self.server is not None and self.server.poll() is None:
            stop_tree(self.server.pid)
            self.server.wait()

    def _crash_stranded(self, seen: set[int]) -> None:
        """Runs whose process was stopped before it could report: Crashed now, resumed at the next start."""
        if not healthy(self.api):
            return
        try:
            with temporary_settings({PREFECT_API_URL: self.api}), get_client(sync_client=True) as client:
                for run in crash_stranded(client, seen):
                    print(f"run {run.name} ({run.id}) did not report its end: marked it ended")
        except Exception as error:  # stopping must go on; the next start reconciles them
            print(f"warning: could not mark runs that were cut short: {error}", file=sys.stderr)


def set_up(client: SyncPrefectClient, settings: Settings, pools: Sequence[str], server: bool) -> list[str]:
    """What `mqi up` makes sure of on the server before it starts anything (each step idempotent);
    who is notified. A worker-only machine (`server` False) checks the shared paths instead."""
    if server:
        settings.scan_dir.mkdir(parents=True, exist_ok=True)
        for pool in pools:
            ensure_work_pool(client, pool)
        limit_case_queue(client, settings, settings.max_running_cases())
        record_shared_paths(client, settings)
        ensure_result_storage(settings)
        ensure_crash_automations(client)
    else:
        check_shared_paths(client, settings)
    ensure_slot_limits(settings)
    return ensure_notifications(client, settings) if server else []


def why_unavailable(error: BaseException) -> str:
    """A server error in a few words: `503 Service Unavailable`, `no answer in time: ReadTimeout`, ..."""
    if isinstance(error, httpx.HTTPStatusError):
        return f"{error.response.status_code} {error.response.reason_phrase}"
    if isinstance(error, httpx.TimeoutException):
        return f"no answer in time: {type(error).__name__}"
    return type(error).__name__


def patiently(what: str, call: Callable[[], T], seconds: float = SERVER_BUSY_SECONDS) -> T:
    """`call()`, tried again while the server is down, restarting or overloaded (5xx), for up to `seconds`.

    Said once, with the cause; what still fails then ends `mqi up` with a ServiceError naming
    the step, not a traceback. Only for calls that may be made twice (reads, ensure-steps,
    runs created with an idempotency key).
    """
    deadline, pause, said = time.monotonic() + seconds, 1.0, False
    while True:
        try:
            return call()
        except Exception as error:
            if not server_unavailable(error):
                raise
            why = why_unavailable(error)
            if time.monotonic() + pause > deadline:
                raise ServiceError(
                    f"{what}: the Prefect server did not answer within {seconds:.0f} s ({why})"
                ) from error
            if not said:
                print(f"{what}: the Prefect server is unavailable ({why}); trying again", flush=True)
                said = True
            time.sleep(pause)  # a back-off between tries
            pause = min(2 * pause, 10.0)


def start_run(what: str, deployment: str) -> FlowRun:
    """A run of `deployment` started by `mqi up`; one run however often the creation is tried again."""
    key = f"mqi-up-{uuid4()}"  # a try whose answer was lost created it already: the same run comes back
    return patiently(
        what,
        lambda: run_deployment(
            deployment, timeout=0, as_subflow=False, tags=["trigger:mqi-up"], idempotency_key=key
        ),
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# SIGTERM (a service manager stopping us) is handled like Ctrl-C.
_STOP_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_interrupt}


def up(
    settings: Settings,
    config: Path,
    port: int | None = None,
    worker_poll: float = 0.5,
    warm: bool = True,
    api: str | None = None,
    server: bool = True,
    host: str = "127.0.0.1",
) -> int:
    """`mqi up`: run the whole service in the foreground until Ctrl-C (on `api`, else `port`, ...).

    With `server=False` (`--no-server --api URL`) only a worker, for a machine that adds
    its GPUs to the server at `api`: no server, no deployments, no file sensor.
    """
    if isinstance(sys.stdout, io.TextIOWrapper):  # a service manager's pipe shows each line as it comes
        sys.stdout.reconfigure(line_buffering=True)
    api = api_url(port, api)
    service = Service(settings, config, api, worker_poll, warm, host)
    previous = {sig: signal.signal(sig, handler) for sig, handler in _STOP_SIGNALS.items()}
    settings.engine_dir.mkdir(parents=True, exist_ok=True)
    try:
        if healthy(api):
            print(f"using the Prefect server at {api}")
        elif server:
            where = "SQLite" if not settings.server.postgres else "PostgreSQL"
            print(f"starting a Prefect server at {api} ({where}; leases and logs under {settings.root})")
            service.start_server()
        with connected(api) as client:
            pools = sorted({pool for pool, _ in work_queues().values()})
            told = patiently("setting up the server", partial(set_up, client, settings, pools, server))
            if server:
                print("deploying prefect.yaml ...")
                deploy(api)
            # A worker-only machine runs case runs only; the sensor and the GPU monitor stay on the
            # server's machine (a sensor run on a lost machine would stop the service).
            cases = [] if server else [work_queues()[settings.case_deployment_name][1]]
            service.start_worker(pools[0], cases)
            sensor = service.start_sensor(client) if server else None
            if server:
                service.start_monitor()
            ui = ui_url(api)
            print(f"Prefect UI:  {ui}")
            if sensor is not None:
                print(f"scan folder: {settings.scan_dir}  (ready marker: {settings.case.ready_marker})")
                print(f"file sensor: {ui}/runs/flow-run/{sensor.id}")
            queue = f" (queue {cases[0]} only)" if cases else ""
            print(f"worker:      mqi-{settings.machine} on pool {pools[0]}{queue}")
            print(f"logs:        {service.log_dir}")
            print(f"notify:      {', '.join(told) if told else 'nobody (notify: in the config)'}")
            print("MQI Communicator is up; Ctrl-C stops it.", flush=True)
            service.watch(client)
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
