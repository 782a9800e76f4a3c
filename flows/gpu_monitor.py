"""The GPU monitor flow: publish each configured GPU's lease state as a table artifact.

Run on a schedule by its deployment, it gives the Prefect UI a page that
answers "which GPUs are busy right now?" (artifact key `gpus-<host>`).
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from config import load_settings
from tasks.gpu.limits import gpu_status
from tasks.gpu.pool import GpuPool


@flow(name="gpu-monitor", log_prints=True)
def gpu_monitor(config: str | None = None) -> list[dict[str, object]]:
    """Publish the GPU table of the configured host; return its rows."""
    settings = load_settings(config)
    rows = gpu_status(GpuPool.of(settings.backend))
    busy = sum(1 for row in rows if row["state"] == "leased")
    create_table_artifact(
        rows, key=f"gpus-{settings.backend.host}", description=f"{busy}/{len(rows)} GPUs leased"
    )
    print(f"{busy}/{len(rows)} GPUs leased on {settings.backend.host}")
    return rows
