"""GPU leases on Prefect global concurrency limits: one limit per GPU, limit 1.

A limit only counts, it does not name a GPU; with one limit per GPU
(`gpu-<host>-<index>`) holding a slot *is* owning that GPU, so the holder can
write its index as GPUID and no two engines ever share a card. Slots are
server-side leases: they work across processes and machines and expire when
a holder dies. `strict=True` everywhere: a missing limit is an error, never a
silently unlimited run.

We talk to the lease API directly rather than through `concurrency()`:
taking "any one free GPU of N" needs a non-blocking try per GPU, and
`concurrency(max_retries=0)` logs every busy GPU as an error. Waiting is
fair and cheap: within a process, beams queue in arrival order and one
thread asks the server for all of them, instead of every waiter sleeping on
Retry-After; it asks again as soon as any GPU of the host is released
(tasks/gpu_wakeup.py), and takes every free GPU one read shows. A beam that
ends while another beam of the same process waits hands its lease straight
to it, even while that thread waits for the server: the slot stays taken on
the server (still one engine per GPU), and the next engine starts without a
round trip to a server that, under load, can take a second or more to answer.
A process on the same machine whose beam has waited longer gets the lease
first, the same way, over a local socket (tasks/gpu_handoff.py).
All lease calls go through a client that retries a busy SQLite server at
once (tasks/prefect_api.py). Each lease and release is also sent as an event
(`mqi.gpu.leased` / `mqi.gpu.released`, resource `mqi.gpu.<host>.<index>`)
so `mqi gpus` and the GPU monitor can say who holds a GPU and since when.
"""

from __future__ import annotations

import contextvars
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL

from config.settings import Settings
from tasks.gpu_handoff import HandoffPoint, Offer, offer
from tasks.gpu_wakeup import HANDED_OVER, RELEASED, gpu_resource, release_signal
from tasks.prefect_api import api_client

logger = get_logger("mqi.gpu")

LEASED = "mqi.gpu.leased"
RELEASE_RETRY_SECONDS = 0.5  # first pause before releasing again while the server is unreachable


def ensure_gpu_limits(settings: Settings) -> dict[str, list[str]]:
    """Create or update (idempotently) one active limit of 1 per configured GPU.

    Limits of this host's GPUs that are no longer configured are disabled, so
    the Concurrency page shows they are out of service instead of leaving them
    looking usable.
    """
    host = settings.backend.host
    wanted = set(settings.gpu_limit_names())
    done: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": [], "disabled": []}
    with api_client() as client:
        existing = {limit.name: limit for limit in client.read_global_concurrency_limits(limit=200)}
        for name in sorted(wanted):
            limit = existing.get(name)
            if limit is None:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                    )
                    done["created"].append(name)
                except ObjectAlreadyExists:  # another case run created it just now: same limit
                    done["unchanged"].append(name)
            elif limit.limit != 1 or not limit.active:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
                )
                done["updated"].append(name)
            else:
                done["unchanged"].append(name)
        for name, limit in sorted(existing.items()):
            if name.startswith(f"gpu-{host}-") and name not in wanted and limit.active:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active=False))
                done["disabled"].append(name)
    return done


def _last_lease_event(client: SyncPrefectClient, resource_id: str) -> dict[str, object] | None:
    """The newest lease/release event of one GPU in the last day: who holds it, since when."""
    page = client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=datetime.now(UTC) - timedelta(days=1)),
            event=EventNameFilter(name=[LEASED, RELEASED]),
            resource=EventResourceFilter(id=[resource_id]),
        ),
        limit=1,
    )
    if not page.events:
        return None
    event = page.events[0]  # newest first
    return {"event": event.event, "since": event.occurred, **event.payload}


def gpu_status(settings: Settings) -> list[dict[str, object]]:
    """One row per configured GPU: limit state from the server, holder from the lease events."""
    rows: list[dict[str, object]] = []
    with api_client() as client:
        for index in settings.backend.gpus:
            name = settings.gpu_limit_name(index)
            row: dict[str, object] = {
                "gpu": index,
                "limit": name,
                "state": "missing limit",
                "case": "",
                "beam": "",
                "since": "",
            }
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                rows.append(row)
                continue
            row["state"] = "disabled" if not limit.active else "leased" if limit.active_slots else "free"
            last = _last_lease_event(client, gpu_resource(settings.backend.host, index))
            if row["state"] == "leased" and last and last["event"] == LEASED:
                row.update(
                    case=last.get("case_id", ""),
                    beam=last.get("beam", ""),
                    since=last["since"].isoformat(timespec="seconds"),
                )  # type: ignore[union-attr]
            rows.append(row)
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
    """Keep the lease alive while engines run on it; if we die, it expires after `duration`."""
    with api_client() as client:
        while not stop.wait(duration / 3):
            try:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=duration)
            except Exception as error:  # the next renewal may still succeed before expiry
                logger.warning("could not renew GPU lease %s: %s", lease_id, error)


class _Lease:
    """One GPU slot held on the server, kept alive by a renewal thread until given back."""

    def __init__(self, settings: Settings, lease_id: UUID, index: int) -> None:
        self.lease_id, self.index, self.host = lease_id, index, settings.backend.host
        self._duration = settings.backend.gpu_lease_seconds
        self.resource = {
            "prefect.resource.id": gpu_resource(self.host, index),
            "prefect.resource.name": settings.gpu_limit_name(index),
        }
        self._stop = threading.Event()
        self._renewer = threading.Thread(  # with our context: the same Prefect settings and server
            target=contextvars.copy_context().run,
            args=(_renew_until, self._stop, lease_id, settings.backend.gpu_lease_seconds),
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

        While the server is down, keep trying until the lease would expire: a fresh Prefect
        client does not retry a refused connection, and a server restarted mid-case would
        otherwise keep the slot taken for up to gpu_lease_seconds.
        """
        self.stop_renewing()
        self._renewer.join()
        deadline, pause = time.monotonic() + self._duration, RELEASE_RETRY_SECONDS
        while True:
            try:
                with api_client() as client:
                    client.release_concurrency_slots_with_lease(self.lease_id)
                break
            except httpx.TransportError as error:  # server down or restarting
                if time.monotonic() + pause >= deadline:
                    logger.warning("could not release GPU %s lease %s: %s", self.index, self.lease_id, error)
                    break
                time.sleep(pause)  # a back-off between tries, not a wait for another thread
                pause = min(2 * pause, 5.0)
            except Exception as error:  # the lease still expires on its own
                logger.warning("could not release GPU %s lease %s: %s", self.index, self.lease_id, error)
                break
        release_signal(self.host).released()  # this process's waiters: no need to wait for the event
        self.announce(RELEASED, who)


SkipReason = Callable[[int], str | None]


def _free_gpus(client: SyncPrefectClient, settings: Settings, candidates: Sequence[int]) -> list[int]:
    """The candidates whose limit shows a free slot, in order, from one read of the server.

    Reading first keeps waiting cheap for the server: a failed slot increment
    is a write (and a second query for Retry-After) on a database that every
    case run also writes to; a read of all limits is one light query.
    """
    wanted = {settings.gpu_limit_name(index): index for index in candidates}
    limits = {limit.name: limit for limit in client.read_global_concurrency_limits(limit=200)}
    missing = sorted(set(wanted) - set(limits))
    if missing:
        raise GpuLimitMissing(
            f"GPU limit(s) {', '.join(missing)} do not exist on the Prefect server; "
            "run `mqi gpus sync` or start via mqi"
        )
    return [index for name, index in wanted.items() if limits[name].active and limits[name].active_slots == 0]


def _take_free(
    client: SyncPrefectClient,
    settings: Settings,
    holder: ConcurrencyLeaseHolder | None,
    candidates: Sequence[int],
    skip: SkipReason | None,
    told: dict[int, str],
) -> Iterator[_Lease]:
    """Take, one by one, the candidates that one read shows free and not in use outside our control.

    In random order: processes woken by the same releases then mostly try different GPUs,
    instead of all losing the race for the first one (each lost try is a write on the
    server's busy database, and the loser's waiting beam waits on).
    """
    host = settings.backend.host
    free = _free_gpus(client, settings, candidates)
    random.shuffle(free)
    for index in free:
        reason = skip(index) if skip is not None else None
        if reason is not None:
            if told.get(index) != reason:
                logger.info("passing over GPU %s on %s: %s", index, host, reason)
                told[index] = reason
            continue
        lease_id = _try_acquire(client, settings.gpu_limit_name(index), settings, holder)
        if lease_id is not None:  # None: another process took it between our read and our write
            yield _Lease(settings, lease_id, index)


def _acquire(
    client: SyncPrefectClient,
    settings: Settings,
    holder: ConcurrencyLeaseHolder | None,
    candidates: Sequence[int],
    skip: SkipReason | None,
) -> _Lease:
    """Ask until one of `candidates` is free (an adopted job's own GPU); take it."""
    released = release_signal(settings.backend.host)
    told: dict[int, str] = {}
    while True:
        seen = released.count()  # before reading: a release from now on ends the wait below
        for lease in _take_free(client, settings, holder, candidates, skip, told):
            return lease
        released.wait(seen)


@dataclass
class _Waiter:
    settings: Settings
    holder: ConcurrencyLeaseHolder | None
    skip: SkipReason | None
    since: float = field(default_factory=time.time)
    lease: _Lease | None = None
    error: BaseException | None = None


class _Broker:
    """The beams of this process waiting for any GPU of one host, and the one thread asking for them.

    Waiters get GPUs in arrival order. The asking thread reads the server and takes
    every free GPU it can, one per waiter; a beam that ends hands its lease to the
    first waiter at once, even while the asking thread waits for a busy server.
    Other processes hear since when the first waiter waits (tasks/gpu_wakeup.py), and
    those on this machine may hand it a lease of theirs (tasks/gpu_handoff.py).
    """

    def __init__(self, host: str) -> None:
        self._host = host
        self._signal = release_signal(host)
        self._cond = threading.Condition()
        self._waiting: deque[_Waiter] = deque()
        self._asking = False
        self._announced: float | None = None
        self._settings: Settings | None = None  # the latest waiter's: for leases handed to us
        self._handoff: HandoffPoint | None = None

    def _listen(self) -> None:
        """Open this process's hand-off socket, once (call holding the lock)."""
        if self._handoff is None:
            try:
                self._handoff = HandoffPoint(self._signal.process, self._host, self._accept, self._receive)
            except OSError as error:  # e.g. no abstract sockets here: leases come from the server only
                logger.warning("GPUs of %s cannot be handed to this process directly: %s", self._host, error)

    def _accept(self) -> bool:
        with self._cond:
            return bool(self._waiting)

    def _receive(self, lease_id: UUID, index: int) -> None:
        """A lease another process handed us: renew it, and give it to the first waiter."""
        assert self._settings is not None  # set before our socket opened
        lease = _Lease(self._settings, lease_id, index)
        if not self.hand_over(lease):  # the waiters got GPUs meanwhile
            lease.give_back()

    def _head_changed(self) -> None:
        """Announce since when the first waiter waits, if that changed (call holding the lock)."""
        since = self._waiting[0].since if self._waiting else None
        if since != self._announced:
            self._announced = since
            self._signal.announce_waiting(since)

    def lease(
        self, settings: Settings, holder: ConcurrencyLeaseHolder | None, skip: SkipReason | None
    ) -> _Lease:
        """Wait for a GPU of the host: handed over by a beam of this process, or taken from the server."""
        waiter = _Waiter(settings, holder, skip)
        try:
            with self._cond:
                self._settings = settings
                self._listen()
                self._waiting.append(waiter)
                self._head_changed()
                if not self._asking:
                    self._asking = True
                    threading.Thread(  # with our context: the same Prefect settings and server
                        target=contextvars.copy_context().run,
                        args=(self._ask,),
                        name=f"mqi-gpu-asker-{settings.backend.host}",
                        daemon=True,
                    ).start()
                self._cond.wait_for(lambda: waiter.lease is not None or waiter.error is not None)
        except BaseException:  # interrupted while waiting: leave the queue, give back what came
            with self._cond:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
                    self._head_changed()
            if waiter.lease is not None:
                waiter.lease.give_back()
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.lease is not None
        return waiter.lease

    def hand_over(self, lease: _Lease, farewell: Callable[[], None] | None = None) -> bool:
        """Give `lease` to the first waiter; False if none waits.

        `farewell` (the old holder's release event) runs first, so that it always
        precedes the new holder's lease event.
        """
        with self._cond:
            if not self._waiting:
                return False
            if farewell is not None:
                farewell()
            self._waiting.popleft().lease = lease
            self._head_changed()
            self._cond.notify_all()
        return True

    def pass_on(self, lease: _Lease, farewell: Callable[[], None], who: Mapping[str, str] | None) -> None:
        """Give an ended beam's lease to the beam that has waited longest on this machine.

        That is a beam of another process here that waited longer than ours, then our first
        waiter; with nobody waiting the slot goes back to the server.
        """
        with self._cond:
            since = self._waiting[0].since if self._waiting else None

        def end_hold() -> None:
            lease.stop_renewing()
            farewell()

        for process in self._signal.nearby_ahead_of(since):
            outcome = offer(process, self._host, lease.index, lease.lease_id, end_hold)
            if outcome is Offer.HANDED:
                return
            if outcome is Offer.BROKEN:
                lease.give_back(who)
                return
            if outcome is Offer.GONE:
                self._signal.forget(process)
        if not self.hand_over(lease, farewell):
            lease.give_back(who)

    def _ask(self) -> None:
        try:
            with api_client() as client:
                self._ask_while_waited_for(client)
        except BaseException as error:  # no client at all: every waiter hears why
            with self._cond:
                for waiter in self._waiting:
                    waiter.error = error
                self._waiting.clear()
                self._head_changed()
                self._asking = False
                self._cond.notify_all()

    def _ask_while_waited_for(self, client: SyncPrefectClient) -> None:
        told: dict[int, str] = {}
        turn_ran_out = False  # the processes that waited longer had their turn and took nothing
        while True:
            with self._cond:
                if not self._waiting:
                    self._asking = False
                    return
                head = self._waiting[0]
            seen = self._signal.count()  # before reading: a release from now on ends the wait below
            try:
                gpus = head.settings.backend.gpus
                for lease in _take_free(client, head.settings, head.holder, gpus, head.skip, told):
                    if turn_ran_out:
                        self._signal.forget_ahead_of(head.since)
                    if not self.hand_over(lease):  # the waiters got GPUs from their own beams
                        lease.give_back()
                    with self._cond:
                        if not self._waiting:  # take no more than are waited for
                            break
            except Exception as error:  # the first waiter fails with it; the others ask again
                with self._cond:
                    if head in self._waiting:
                        self._waiting.remove(head)
                        self._head_changed()
                        head.error = error
                        self._cond.notify_all()
                continue
            with self._cond:
                since = self._announced  # the first waiter's, as the other processes heard it
            turn_ran_out = self._signal.wait(seen, since)


_brokers: dict[tuple[str, str], _Broker] = {}
_brokers_lock = threading.Lock()


def _broker(host: str) -> _Broker:
    """This process's broker for `host` on the current Prefect server."""
    with _brokers_lock:
        key = (str(PREFECT_API_URL.value()), host)
        if key not in _brokers:
            _brokers[key] = _Broker(host)
        return _brokers[key]


@contextmanager
def gpu_lease(
    settings: Settings,
    holder: ConcurrencyLeaseHolder | None = None,
    only: Sequence[int] | None = None,
    skip: SkipReason | None = None,
    who: Mapping[str, str] | None = None,
) -> Iterator[int]:
    """Hold one free GPU of the configured host for the duration of the block; yield its index.

    `only` restricts the choice (an adopted job must hold the GPU it runs on);
    `skip(index)` returns why a GPU must be passed over (e.g. nvidia-smi shows
    a foreign process); `who` (case_id, beam) is published with the lease.
    """
    broker = _broker(settings.backend.host)
    if only is None:
        lease = broker.lease(settings, holder, skip)
    else:
        with api_client() as client:
            lease = _acquire(client, settings, holder, only, skip)
    lease.announce(LEASED, who)
    release_signal(settings.backend.host).follow()  # to hear who waits by the time we are done
    try:
        yield lease.index
    finally:
        farewell = partial(lease.announce, RELEASED, {**(who or {}), HANDED_OVER: True})
        broker.pass_on(lease, farewell, who)
