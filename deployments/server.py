"""The Prefect server the service talks to, and what the service sets up on it.

Where the API is (`PREFECT_API_URL`, else the local server `mqi up` starts on
127.0.0.1), whether it answers, and the set-up every start repeats idempotently: the
process work pool whose runs start `python -m prefect.engine` directly, the case queue's
limit of running cases, and the deployments of prefect.yaml.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.process import ProcessWorker

from config.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
DEFAULT_PORT = 4200
PREFECT_CLI = str(Path(sys.executable).with_name("prefect"))  # the one of this environment
SENSOR_FLOW = "file-sensor"
SENSOR_DEPLOYMENT = f"{SENSOR_FLOW}/sensor"
MONITOR_FLOW = "gpu-monitor"
MONITOR_DEPLOYMENT = f"{MONITOR_FLOW}/gpus"


class ServiceError(RuntimeError):
    """The service cannot start or keep running; the message says what and where to look."""


def api_url(port: int | None = None, api: str | None = None) -> str:
    """The server a command talks to: `--api`, else `--port` on 127.0.0.1, else PREFECT_API_URL
    (environment or Prefect profile), else the local one `mqi up` starts on port 4200.

    An option given on the command line wins over PREFECT_API_URL, with a note saying so.
    """
    chosen = api.rstrip("/") if api else f"http://127.0.0.1:{port}/api" if port is not None else None
    configured = PREFECT_API_URL.value()
    if chosen is None:
        return configured or f"http://127.0.0.1:{DEFAULT_PORT}/api"
    if configured and configured.rstrip("/") != chosen:
        print(f"note: using {chosen}, not PREFECT_API_URL={configured}", file=sys.stderr)
    return chosen


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
    pool, queue = work_queues()[settings.case_deployment_name]
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
