"""A dead holder's GPU at once: the lease of a job's holder that is gone is released, not waited out.

A run that adopts a job still running on a GPU must hold that GPU's lease. If the run that
held it is gone (its process was killed: the run is Crashed, or it ended otherwise, or it is
an earlier attempt of this very run), nobody renews its lease, and waiting for the lease to
expire would keep the GPU idle for up to `gpu_lease_seconds`. The job's holder record names
the holder's flow run and lease (tasks/backends/base.py: Holder); when the server says that
run is over, its lease is released here and the GPU is taken at once. A holder that may
still be alive is never robbed: only the lease the record names is released, and only then.
"""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger

from tasks.gpu.events import RELEASED
from tasks.gpu.pool import GpuPool
from tasks.gpu.wakeup import release_signal
from tasks.prefect_api.client import api_client

logger = get_logger("mqi.gpu")


def holder_gone(
    client: SyncPrefectClient, run: str, attempt: int, current_run: str | None, current_attempt: int
) -> str | None:
    """Why the holder (flow run `run`, its run count `attempt`) is gone, or None if it may be alive.

    Gone: its run no longer exists or is in a final state, or it is an earlier attempt of the
    current run (a Retry counts the run up; the earlier attempt's process is dead).
    """
    if run == current_run:
        return f"an earlier attempt ({attempt}) of this run" if attempt < current_attempt else None
    try:
        flow_run = client.read_flow_run(UUID(run))
    except ValueError:  # not a flow run id: cannot be asked about, so not robbed
        return None
    except ObjectNotFound:
        return f"its run {run} no longer exists"
    if flow_run.state is not None and flow_run.state.is_final():
        return f"its run {flow_run.name} ended {flow_run.state.name}"
    return None


def take_over(
    pool: GpuPool,
    index: int,
    lease: str,
    run: str,
    attempt: int,
    current_run: str | None,
    current_attempt: int,
) -> str | None:
    """Release the lease of GPU `index` that a gone holder left; why it was gone, or None if not released.

    A holder that ended normally gave its lease back, and an expired lease is gone too: while
    the GPU's slot is free there is nothing to release (and nothing to say).
    """
    with api_client() as client:
        why = holder_gone(client, run, attempt, current_run, current_attempt)
        if why is None:
            return None
        if not client.read_global_concurrency_limit_by_name(pool.limit_name(index)).active_slots:
            return None
    release_lease(pool, index, lease, why)
    return why


def release_lease(pool: GpuPool, index: int, lease: str, why: str) -> None:
    """Release GPU `index`'s lease `lease` on behalf of a holder that cannot (gone, or stopped); say so.

    An expired or unknown lease is a no-op on the server: never another holder's slot.
    """
    try:
        lease_id = UUID(lease)
    except ValueError:
        return
    with api_client() as client:
        client.release_concurrency_slots_with_lease(lease_id)
    release_signal(pool.host).released()
    payload = {"lease_id": lease, "released_for": why}
    emit_event(RELEASED, resource=pool.event_resource(index), payload=payload)
    logger.info("GPU %s on %s: lease %s released (%s)", index, pool.host, lease, why)
