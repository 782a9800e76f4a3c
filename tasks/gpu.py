"""GPU leases on Prefect global concurrency limits: one limit per GPU, limit 1.

A limit only counts, it does not name a GPU; with one limit per GPU
(`gpu-<host>-<index>`) holding a slot *is* owning that GPU, so the holder can
write its index as GPUID and no two engines ever share a card. Slots are
server-side leases: they work across processes and machines and expire when
a holder dies. `strict=True` everywhere: a missing limit is an error, never a
silently unlimited run.

We talk to the lease API directly rather than through `concurrency()`:
taking "any one free GPU of N" needs a non-blocking try per GPU, and
`concurrency(max_retries=0)` logs every busy GPU as an error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger

from config.settings import Settings

logger = get_logger("mqi.gpu")


def ensure_gpu_limits(settings: Settings) -> list[str]:
    """Create or update (idempotently) one active limit of 1 per configured GPU."""
    names = settings.gpu_limit_names()
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                )
                continue
            if limit.limit != 1 or not limit.active:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
                )
    return names


def gpu_status(settings: Settings) -> list[dict[str, object]]:
    """One row per configured GPU: its limit and whether a slot is taken (the server's view)."""
    rows: list[dict[str, object]] = []
    with get_client(sync_client=True) as client:
        for index, name in zip(settings.backend.gpus, settings.gpu_limit_names(), strict=True):
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                rows.append({"gpu": index, "limit": name, "exists": False, "active": False, "leased": False})
                continue
            rows.append(
                {
                    "gpu": index,
                    "limit": name,
                    "exists": True,
                    "active": limit.active,
                    "leased": limit.active_slots > 0,
                }
            )
    return rows


class GpuLimitMissing(RuntimeError):
    """A configured GPU has no concurrency limit: refuse rather than run unlimited."""


def _try_acquire(
    client: SyncPrefectClient, name: str, settings: Settings, holder: ConcurrencyLeaseHolder | None
) -> UUID | None:
    """Take the GPU's single slot if it is free; None if another holder has it."""
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name],
            slots=1,
            mode="concurrency",
            lease_duration=settings.backend.gpu_lease_seconds,
            holder=holder,
        )
    except httpx.HTTPStatusError as error:
        if error.response.status_code == 423:  # Locked: the GPU is taken
            return None
        raise
    body = response.json()
    if not body.get("limits"):
        raise GpuLimitMissing(
            f"GPU limit {name} does not exist on the Prefect server; run `mqi gpus sync` or start via mqi"
        )
    return UUID(body["lease_id"])


def _renew_until(stop: threading.Event, lease_id: UUID, duration: float) -> None:
    """Keep the lease alive while the engine runs; if we die, it expires after `duration`."""
    with get_client(sync_client=True) as client:
        while not stop.wait(duration / 3):
            try:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=duration)
            except Exception as error:  # the next renewal may still succeed before expiry
                logger.warning("could not renew GPU lease %s: %s", lease_id, error)


@contextmanager
def gpu_lease(
    settings: Settings,
    holder: ConcurrencyLeaseHolder | None = None,
    only: Sequence[int] | None = None,
    wait_seconds: float = 0.5,
) -> Iterator[int]:
    """Hold one free GPU of the configured host for the duration of the block; yield its index.

    `only` restricts the choice (an adopted job must hold the GPU it runs on).
    Tries each GPU's limit without waiting; when all are taken, waits a short
    interval and tries again (arrival order is not guaranteed here).
    """
    host, duration = settings.backend.host, settings.backend.gpu_lease_seconds
    with get_client(sync_client=True) as client:
        lease: tuple[UUID, int] | None = None
        while lease is None:
            for index in settings.backend.gpus if only is None else only:
                lease_id = _try_acquire(client, f"gpu-{host}-{index}", settings, holder)
                if lease_id is not None:
                    lease = (lease_id, index)
                    break
            else:
                time.sleep(wait_seconds)  # every GPU is busy: try again shortly
        lease_id, index = lease
        stop = threading.Event()
        renewer = threading.Thread(target=_renew_until, args=(stop, lease_id, duration), daemon=True)
        renewer.start()
        try:
            yield index
        finally:
            stop.set()
            renewer.join()
            try:
                client.release_concurrency_slots_with_lease(lease_id)
            except Exception as error:  # the lease still expires on its own
                logger.warning("could not release GPU %s lease %s: %s", index, lease_id, error)
