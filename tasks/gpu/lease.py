"""One GPU's slot on the server: taken if free, renewed while its engine runs, given back when it ends.

Slots are server-side leases: they work across processes and machines and expire when a
holder dies (about `lease_seconds` after its last renewal). `strict` in spirit: a missing
limit is an error, never a silently unlimited run. A free GPU is found by one read of
every limit, then a slot increment on each that looked free (a failed increment is a
write on the server's busy database, a read is one light query).
"""

from __future__ import annotations

import contextvars
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.events import emit_event
from prefect.logging import get_logger

from tasks.common.stopping import check
from tasks.gpu.events import RELEASED
from tasks.gpu.limits import GpuLimitMissing
from tasks.gpu.pool import GpuPool, SkipReason
from tasks.gpu.wakeup import release_signal
from tasks.prefect_api.client import api_client, server_unavailable
from tasks.prefect_api.internals import granted_lease

logger = get_logger("mqi.gpu")

RELEASE_RETRY_SECONDS = 0.5  # first pause before releasing again while the server is unreachable


def _try_acquire(
    client: SyncPrefectClient, pool: GpuPool, index: int, holder: ConcurrencyLeaseHolder | None
) -> UUID | None:
    """Take the GPU's single slot if it is free; None if another holder has it."""
    try:
        name = pool.limit_name(index)
        response = client.increment_concurrency_slots_with_lease(
            names=[name],
            slots=1,
            mode="concurrency",
            lease_duration=pool.lease_seconds,
            holder=holder,
        )
    except httpx.HTTPStatusError as error:
        if error.response.status_code == 423:  # Locked: the GPU is taken
            return None
        raise
    lease_id = granted_lease(response)
    if lease_id is None:
        raise GpuLimitMissing(
            f"GPU limit {name} does not exist on the Prefect server; run `mqi gpus sync` or start via mqi"
        )
    return lease_id


def _renew_until(stop: threading.Event, lease_id: UUID, duration: float) -> None:
    """Keep the lease alive while engines run on it; if we die, it expires after `duration`."""
    with api_client() as client:
        while not stop.wait(duration / 3):
            try:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=duration)
            except Exception as error:  # the next renewal may still succeed before expiry
                logger.warning("could not renew GPU lease %s: %s", lease_id, error)


class Lease:
    """One GPU slot held on the server, kept alive by a renewal thread until given back."""

    def __init__(self, pool: GpuPool, lease_id: UUID, index: int) -> None:
        self.lease_id, self.index, self.host = lease_id, index, pool.host
        self._duration = pool.lease_seconds
        self.resource = pool.event_resource(index)
        self._stop = threading.Event()
        self._renewer = threading.Thread(  # with our context: the same Prefect settings and server
            target=contextvars.copy_context().run,
            args=(_renew_until, self._stop, lease_id, pool.lease_seconds),
            daemon=True,
        )
        self._renewer.start()

    def announce(self, event: str, who: Mapping[str, object] | None) -> None:
        emit_event(event, resource=self.resource, payload={**(who or {}), "lease_id": str(self.lease_id)})

    def stop_renewing(self) -> None:
        """Another process renews it from now on (a renewal in flight does no harm)."""
        self._stop.set()

    def give_back(self, who: Mapping[str, str] | None = None) -> None:
        """Release the slot, then say so (other processes' waiters ask on that event).

        While the server is down or overloaded, keep trying until the lease would expire: a
        fresh Prefect client does not retry a refused connection, gives up on a busy database's
        503 after a few tries, and a slot not released stays taken for up to gpu_lease_seconds.
        """
        self.stop_renewing()
        self._renewer.join()
        deadline, pause = time.monotonic() + self._duration, RELEASE_RETRY_SECONDS
        while True:
            try:
                with api_client() as client:
                    client.release_concurrency_slots_with_lease(self.lease_id)
                break
            except Exception as error:  # the lease still expires on its own
                if not server_unavailable(error) or time.monotonic() + pause >= deadline:
                    logger.warning("could not release GPU %s lease %s: %s", self.index, self.lease_id, error)
                    break
                time.sleep(pause)  # a back-off between tries, not a wait for another thread
                pause = min(2 * pause, 5.0)
        release_signal(self.host).released()  # this process's waiters: no need to wait for the event
        self.announce(RELEASED, who)


def _free_gpus(client: SyncPrefectClient, pool: GpuPool, candidates: Sequence[int]) -> list[int]:
    """The candidates whose limit shows a free slot (once per free slot), from one read of the server.

    Reading first keeps waiting cheap for the server: a failed slot increment
    is a write (and a second query for Retry-After) on a database that every
    case run also writes to; a read of all limits is one light query.
    """
    wanted = {pool.limit_name(index): index for index in candidates}
    limits = {limit.name: limit for limit in client.read_global_concurrency_limits(limit=200)}
    missing = sorted(set(wanted) - set(limits))
    if missing:
        raise GpuLimitMissing(
            f"GPU limit(s) {', '.join(missing)} do not exist on the Prefect server; "
            "run `mqi gpus sync` or start via mqi"
        )
    return [  # a GPU once if free; a limit of several slots (a capped Slurm queue) once per free slot
        index
        for name, index in wanted.items()
        if limits[name].active
        for _ in range(limits[name].limit - limits[name].active_slots)
    ]


def take_free(
    client: SyncPrefectClient,
    pool: GpuPool,
    holder: ConcurrencyLeaseHolder | None,
    candidates: Sequence[int],
    skip: SkipReason | None,
    told: dict[int, str],
    wanted: Callable[[], bool] = lambda: True,
) -> Iterator[Lease]:
    """Take, one by one, the candidates that one read shows free and not in use outside our control.

    In random order: processes woken by the same releases then mostly try different GPUs,
    instead of all losing the race for the first one (each lost try is a write on the
    server's busy database, and the loser's waiting beam waits on). None once `wanted()` is
    false: a beam that got a GPU handed over while the read was slow needs no other.
    """
    free = _free_gpus(client, pool, candidates)
    random.shuffle(free)
    for index in free:
        if not wanted():
            return
        reason = skip(index) if skip is not None else None
        if reason is not None:
            if told.get(index) != reason:
                logger.info("passing over GPU %s on %s: %s", index, pool.host, reason)
                told[index] = reason
            continue
        lease_id = _try_acquire(client, pool, index, holder)
        if lease_id is not None:  # None: another process took it between our read and our write
            yield Lease(pool, lease_id, index)


def acquire(
    client: SyncPrefectClient,
    pool: GpuPool,
    holder: ConcurrencyLeaseHolder | None,
    candidates: Sequence[int],
    skip: SkipReason | None,
) -> Lease:
    """Ask until one of `candidates` is free (an adopted job's own GPU); take it."""
    released = release_signal(pool.host)
    told: dict[int, str] = {}
    while True:
        check(f"taking GPU {', '.join(map(str, candidates))}")
        seen = released.count()  # before reading: a release from now on ends the wait below
        for lease in take_free(client, pool, holder, candidates, skip, told):
            return lease
        released.wait(seen)
