"""The GPU monitor flow: one long-running run that keeps each GPU's lease state in a table artifact.

Like the file sensor, it runs until cancelled (`mqi up` starts it, named "gpu-monitor"),
so the run list holds one monitor run instead of one every minute. It follows the GPU
lease and release events on the server's event stream and publishes the table again
(artifact `gpus-<host>`, "which GPUs are busy right now?") whenever one arrives, and at
least every REFRESH_SECONDS (a lease that expired because its holder died sends no event).
Changes that come together (a hand-off is a release and a lease; a busy GPU node sends
several a second) are published together, at most once every SETTLE_SECONDS: each
version of the table is two reads and a write on the server every case run shares.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from datetime import UTC, datetime

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.events import Event
from prefect.logging import get_run_logger

from config import load_settings
from tasks.gpu.events import LEASED, RELEASED, host_prefix
from tasks.gpu.limits import gpu_status, lease_event, leased_text
from tasks.gpu.pool import GpuPool
from tasks.gpu.wakeup import follow_gpu_events

REFRESH_SECONDS = 60.0
SETTLE_SECONDS = 1.0  # after a change, the other changes of this moment join it in one version
MONITOR_RUN_NAME = "gpu-monitor"


def publish_gpu_table(pool: GpuPool, heard: dict[int, dict[str, object]]) -> list[dict[str, object]]:
    """The GPU table of `pool` as the server has it now, published as the artifact gpus-<host>."""
    rows = gpu_status(pool, heard)
    create_table_artifact(rows, key=f"gpus-{pool.host}", description=f"{leased_text(rows)} on {pool.host}")
    return rows


@flow(name="gpu-monitor", flow_run_name=MONITOR_RUN_NAME, log_prints=False)
def gpu_monitor(config: str | None = None) -> None:
    """Until cancelled: publish the GPU table of the configured host on every lease and release."""
    settings = load_settings(config)
    pool = GpuPool.of(settings.backend)
    logger = get_run_logger()
    changed = threading.Event()
    newest: dict[int, dict[str, object]] = {}  # GPU -> its newest lease event heard
    lock = threading.Lock()

    def heard(event: Event) -> None:
        index = int(event.resource.id.removeprefix(host_prefix(pool.host)))
        with lock:
            newest[index] = lease_event(event)
        changed.set()

    def connected(following: bool) -> None:
        changed.set()  # missed events: read the table again

    events = follow_gpu_events(pool.host, [LEASED, RELEASED], datetime.now(UTC), heard, connected)
    threading.Thread(  # with our context: the same Prefect settings and server
        target=contextvars.copy_context().run,
        args=(asyncio.run, events),
        name=f"mqi-gpu-monitor-{pool.host}",
        daemon=True,
    ).start()
    logger.info("publishing the table of GPUs of %s (artifact gpus-%s) as they change", pool.host, pool.host)
    said = ""
    while True:
        changed.clear()  # before reading: an event from now on means a newer state
        try:
            with lock:
                known = dict(newest)
            text = leased_text(publish_gpu_table(pool, known))
        except Exception as error:  # the server is busy or restarting: the next change or refresh
            logger.warning("could not publish the GPU table: %s", error)
            text = said
        if text != said:
            logger.info("GPUs of %s: %s", pool.host, text)
            said = text
        if changed.wait(REFRESH_SECONDS):
            time.sleep(SETTLE_SECONDS)  # a pace for the server, not a wait for another thread
