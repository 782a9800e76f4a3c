"""The running service on one machine: `mqi up`, `mqi status` and `mqi rerun`.

`mqi up` brings up, in the foreground, everything that turns dropped case folders into
finished runs: a Prefect server on 127.0.0.1 (or the healthy one already at the URL),
the work pool (at most `sensor.max_running_cases` case runs at a time, the others queued) and GPU
limits, the deployments of prefect.yaml, a worker that polls every 0.5 s (Prefect's
default is 10 s: a case would wait up to 10 s for it), and a run of the file-sensor
deployment. The worker is deployments/warm_worker.py (flow runs forked from a process
that has Prefect imported: about 2 s sooner Running), or Prefect's own process worker
with `--plain-worker`. Ctrl-C (or SIGTERM) stops exactly what it started: the sensor
run is cancelled, then the process groups of the worker and of every process below it
(flow runs and the tools they run) are terminated, and the server last, so flow runs
can still report that they were interrupted. A run cut short ends Crashed; the sensor
resumes it at the next start.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO
from uuid import UUID

import httpx
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling
from prefect.workers.process import ProcessWorker
from rich.console import Console
from rich.table import Table

from config.settings import Settings
from deployments.prefect_env import apply_server_defaults
from deployments.processes import stop_tree
from flows.sensor import start_case_run
from tasks.casefolder import inspect_case
from tasks.gpu import ensure_gpu_limits
from tasks.readiness import CaseFolder, case_folders, room_tag

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
DEFAULT_PORT = 4200
SENSOR_FLOW = "file-sensor"
SENSOR_DEPLOYMENT = f"{SENSOR_FLOW}/sensor"
SERVER_START_SECONDS = 120  # a first start migrates the SQLite database (about 15 s here)
SENSOR_START_SECONDS = 120
CANCEL_SECONDS = 30
STATUS_COLUMNS = ("case", "state", "beams", "trigger", "started", "duration", "message")
BEAMS_DONE = re.compile(r"(\d+)/(\d+) beams done")
ACTIVE_STATES = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
PREFECT_CLI = str(Path(sys.executable).with_name("prefect"))  # the one of this environment


class ServiceError(RuntimeError):
    """The service cannot start or keep running; the message says what and where to look."""


def api_url(port: int = DEFAULT_PORT) -> str:
    """PREFECT_API_URL when set (environment or Prefect profile), else the local one `mqi up` starts."""
    return PREFECT_API_URL.value() or f"http://127.0.0.1:{port}/api"


def ui_url(api: str) -> str:
    return api.removesuffix("/").removesuffix("/api")


def healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def connected(api: str) -> Iterator[SyncPrefectClient]:
    """A client of the server at `api` (which must be up), for this process's Prefect calls too."""
    if not healthy(api):
        raise ServiceError(f"no Prefect server answers at {api}; start the service with `mqi up`")
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def work_queues(prefect_yaml: Path = PREFECT_YAML) -> dict[str, tuple[str, str]]:
    """Deployment name -> (work pool, work queue), as prefect.yaml declares them."""
    data = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8"))
    return {
        deployment["name"]: (deployment["work_pool"]["name"], deployment["work_pool"]["work_queue_name"])
        for deployment in data["deployments"]
    }


def limit_case_queue(client: SyncPrefectClient, settings: Settings, limit: int) -> None:
    """At most `limit` case runs at a time; the others wait in the queue (Scheduled, in the UI).

    A burst of cases would otherwise start one Python process each at once: on a small
    machine they fight for the CPU and the database, and they would only wait for GPUs.
    """
    pool, queue = work_queues()[settings.sensor.case_deployment.split("/", 1)[1]]
    try:
        client.update_work_queue(
            client.read_work_queue_by_name(queue, work_pool_name=pool).id, concurrency_limit=limit
        )
    except ObjectNotFound:
        client.create_work_queue(name=queue, work_pool_name=pool, concurrency_limit=limit)


def ensure_work_pool(client: SyncPrefectClient, name: str) -> None:
    """Create (or update) a process pool whose flow runs start `python -m prefect.engine` directly.

    Without a command, Prefect 3.8's process worker starts each run through a workspace
    supervisor: a second Python start-up, about 2 s more before a case is Running.
    """
    template = ProcessWorker.get_default_base_job_template()
    command = shlex.join([sys.executable, "-m", "prefect.engine"])
    template["variables"]["properties"]["command"]["default"] = command
    client.create_work_pool(
        WorkPoolCreate(
            name=name,
            type="process",
            base_job_template=template,
            description="MQI Communicator: case runs, the file sensor and the GPU monitor on this machine",
        ),
        overwrite=True,
    )


def deploy(api: str) -> None:
    """`prefect deploy --all` on the repository's prefect.yaml."""
    argv = [PREFECT_CLI, "--no-prompt", "deploy", "--all"]
    done = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env={**os.environ, "PREFECT_API_URL": api},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise ServiceError(f"`{shlex.join(argv)}` in {REPO_ROOT} failed (exit {done.returncode}):\n{tail}")


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
            ensure_gpu_limits(settings)
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


def _duration(run: FlowRun) -> str:
    seconds = run.estimated_run_time.total_seconds()
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def status_rows(settings: Settings, client: SyncPrefectClient, limit: int) -> list[dict[str, str]]:
    """The most recent case runs, newest first: case, state, beams done, trigger, start, duration."""
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[settings.sensor.case_deployment.split("/")[0]])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=limit,
    )
    rows = []
    for run in runs:
        message = (run.state.message or "") if run.state else ""
        beams = BEAMS_DONE.search(message)
        start = run.start_time or run.expected_start_time
        rows.append(
            {
                "case": run.name,
                "state": run.state_name or "",
                "beams": f"{beams.group(1)}/{beams.group(2)}" if beams else "",
                "trigger": ", ".join(
                    tag.removeprefix("trigger:") for tag in run.tags if tag.startswith("trigger:")
                ),
                "started": start.astimezone().strftime("%Y-%m-%d %H:%M:%S") if start else "",
                "duration": _duration(run) if run.start_time else "",
                "message": message.splitlines()[0][:100] if message else "",
            }
        )
    return rows


def sensor_state(client: SyncPrefectClient) -> str:
    """The file sensor's newest run, as 'name: state'."""
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[SENSOR_FLOW])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=1,
    )
    return f"{runs[0].name}: {runs[0].state_name}" if runs else "never started"


def find_case(settings: Settings, case: str) -> CaseFolder:
    """A case given by its folder (in the scan folder or not) or by its case id in the scan folder."""
    given = Path(case)
    wanted = given.resolve() if given.is_dir() else None
    found = [
        folder
        for folder in case_folders(settings.scan_dir, settings.sensor.room_folders, {})
        if (folder.path.resolve() == wanted if wanted else folder.case_id == case)
    ]
    if len(found) == 1:
        return found[0]
    if wanted is not None:
        return CaseFolder(wanted, wanted.name, None)
    if found:
        where = ", ".join(str(folder.path) for folder in found)
        raise ServiceError(f"case {case!r} is in several folders: {where}; give the folder")
    raise ServiceError(f"no case folder {case!r} in {settings.scan_dir} or its room folders; give the folder")


def rerun(settings: Settings, case: str, beams: list[int], force: bool) -> FlowRun:
    """A new run of the case deployment, tagged trigger:manual; finished beams are reused unless asked."""
    folder = find_case(settings, case)
    inspection = inspect_case(
        folder.path, ready_marker=settings.case.ready_marker, delivery_policy=settings.case.delivery_policy
    )
    return start_case_run(
        settings,
        folder.path,
        trigger="manual",
        room=room_tag(folder, inspection),
        extra={"rerun_beams": beams, "force": force},
    )


def wait_final(client: SyncPrefectClient, run_id: UUID, poll: float = 1.0) -> FlowRun:
    """The run once it reached a final state."""
    run = client.read_flow_run(run_id)
    while run.state is None or not run.state.is_final():
        time.sleep(poll)
        run = client.read_flow_run(run_id)
    return run


def print_status(settings: Settings, port: int, limit: int) -> int:
    """`mqi status`: the recent case runs and the file sensor."""
    api = api_url(port)
    try:
        with connected(api) as client:
            rows = status_rows(settings, client, limit)
            sensor = sensor_state(client)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = Table(*STATUS_COLUMNS, title=f"recent cases ({ui_url(api)})")
    for row in rows:
        table.add_row(*(row[column] for column in STATUS_COLUMNS))
    console = Console()
    console.print(table)
    console.print(f"file sensor: {sensor}")
    return 0


def start_rerun(settings: Settings, port: int, case: str, beams: list[int], force: bool, wait: bool) -> int:
    """`mqi rerun`: start the run, print its link; with `wait`, its final state (exit 1 unless Completed)."""
    api = api_url(port)
    try:
        with connected(api) as client:
            run = rerun(settings, case, beams, force)
            print(f"run {run.name} started: {ui_url(api)}/runs/flow-run/{run.id}", flush=True)
            if not wait:
                return 0
            run = wait_final(client, run.id)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    assert run.state is not None  # final
    print(f"{run.state.name}: {run.state.message}")
    return 0 if run.state.is_completed() else 1
