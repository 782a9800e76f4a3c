"""GPU leases on Prefect global concurrency limits: one limit per GPU, limit 1.

A limit only counts, it does not name a GPU; with one limit per GPU
(`gpu-<host>-<index>`) holding a slot *is* owning that GPU, so the holder can
write its index as GPUID and no two engines ever share a card. Slots are
server-side leases: they work across processes and machines and expire when
a holder dies. `strict=True` everywhere: a missing limit is an error, never a
silently unlimited run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger

from config.settings import Settings

try:  # the exception's home moved between Prefect 3 releases
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
except ImportError:  # pragma: no cover
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

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


def _is_locked(error: ConcurrencySlotAcquisitionError) -> bool:
    cause = error.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423


@contextmanager
def gpu_lease(settings: Settings, wait_seconds: float = 0.5) -> Iterator[int]:
    """Hold one free GPU of the configured host for the duration of the block; yield its index.

    Tries each GPU's limit without waiting; when all are taken, waits a short
    interval and tries again (arrival order is not guaranteed here).
    """
    host = settings.backend.host
    while True:
        for index in settings.backend.gpus:
            held = ExitStack()
            try:
                held.enter_context(
                    concurrency(
                        f"gpu-{host}-{index}",
                        occupy=1,
                        max_retries=0,
                        strict=True,
                        lease_duration=settings.backend.gpu_lease_seconds,
                    )
                )
            except ConcurrencySlotAcquisitionError as error:
                if _is_locked(error):
                    continue
                raise
            with held:
                yield index
            return
        time.sleep(wait_seconds)  # every GPU is busy: try again shortly
