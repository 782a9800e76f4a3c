"""Which GPU a beam gets: the beams of a process queue for a host's GPUs, one thread asks for them all.

Waiting is fair and cheap: within a process, beams queue in arrival order and one thread
asks the server for all of them, instead of every waiter sleeping on Retry-After; it asks
again as soon as any GPU of the host is released (tasks/gpu/wakeup.py), and takes every
free GPU one read shows. A beam that ends while another beam of the same process waits
hands its lease straight to it, even while that thread waits for the server: the slot
stays taken on the server (still one engine per GPU), and the next engine starts without
a round trip to a server that, under load, can take a second or more to answer. A process
on the same machine whose beam has waited longer gets the lease first, the same way, over
a local socket (tasks/gpu/handoff.py). Each lease and release is also sent as an event
(`mqi.gpu.leased` / `mqi.gpu.released`, resource `mqi.gpu.<host>.<index>`), so `mqi gpus`
and the GPU monitor can say who holds a GPU and since when.

We talk to the lease API directly rather than through `concurrency()`: taking "any one
free GPU of N" needs a non-blocking try per GPU, and `concurrency(max_retries=0)` logs
every busy GPU as an error.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL

from tasks.common.stopping import Stopped, check, on_stop, stopping
from tasks.gpu.events import HANDED_OVER, LEASED, RELEASED
from tasks.gpu.handoff import HandoffPoint, Offer, offer
from tasks.gpu.lease import Lease, acquire, take_free
from tasks.gpu.pool import GpuPool, SkipReason
from tasks.gpu.wakeup import release_signal
from tasks.prefect_api.client import api_client

logger = get_logger("mqi.gpu")


@dataclass
class _Waiter:
    holder: ConcurrencyLeaseHolder | None
    skip: SkipReason | None
    since: float = field(default_factory=time.time)
    lease: Lease | None = None
    error: BaseException | None = None


class _Broker:
    """The beams of this process waiting for any GPU of one host, and the one thread asking for them.

    Waiters get GPUs in arrival order. The asking thread reads the server and takes
    every free GPU it can, one per waiter; a beam that ends hands its lease to the
    first waiter at once, even while the asking thread waits for a busy server.
    Other processes hear since when the first waiter waits (tasks/gpu/wakeup.py), and
    those on this machine may hand it a lease of theirs (tasks/gpu/handoff.py).
    """

    def __init__(self, pool: GpuPool) -> None:
        self._pool = pool
        self._host = pool.host
        self._signal = release_signal(pool.host)
        self._cond = threading.Condition()
        self._waiting: deque[_Waiter] = deque()
        self._asking = False
        self._announced: float | None = None
        self._handoff: HandoffPoint | None = None
        on_stop(self._wake)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

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
        lease = Lease(self._pool, lease_id, index)
        if not self.hand_over(lease):  # the waiters got GPUs meanwhile
            lease.give_back()

    def _head_changed(self) -> None:
        """Announce since when the first waiter waits, if that changed (call holding the lock)."""
        since = self._waiting[0].since if self._waiting else None
        if since != self._announced:
            self._announced = since
            self._signal.announce_waiting(since)

    def lease(self, holder: ConcurrencyLeaseHolder | None, skip: SkipReason | None) -> Lease:
        """Wait for a GPU of the host: handed over by a beam of this process, or taken from the server."""
        waiter = _Waiter(holder, skip)
        try:
            with self._cond:
                self._listen()
                self._waiting.append(waiter)
                self._head_changed()
                if not self._asking:
                    self._asking = True
                    threading.Thread(  # with our context: the same Prefect settings and server
                        target=contextvars.copy_context().run,
                        args=(self._ask,),
                        name=f"mqi-gpu-asker-{self._host}",
                        daemon=True,
                    ).start()
                self._cond.wait_for(
                    lambda: waiter.lease is not None or waiter.error is not None or stopping()
                )
                check("taking a GPU")
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

    def hand_over(self, lease: Lease, farewell: Callable[[], None] | None = None) -> bool:
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

    def pass_on(self, lease: Lease, farewell: Callable[[], None], who: Mapping[str, str] | None) -> None:
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

    def _waited_for(self) -> bool:
        with self._cond:
            return bool(self._waiting)

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
                gpus = self._pool.gpus
                free = take_free(client, self._pool, head.holder, gpus, head.skip, told, self._waited_for)
                for lease in free:
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


_brokers: dict[tuple[str, GpuPool], _Broker] = {}
_brokers_lock = threading.Lock()


def _broker(pool: GpuPool) -> _Broker:
    """This process's broker for `pool` on the current Prefect server."""
    with _brokers_lock:
        key = (str(PREFECT_API_URL.value()), pool)
        if key not in _brokers:
            _brokers[key] = _Broker(pool)
        return _brokers[key]


@contextmanager
def gpu_lease(
    pool: GpuPool,
    holder: ConcurrencyLeaseHolder | None = None,
    only: Sequence[int] | None = None,
    skip: SkipReason | None = None,
    who: Mapping[str, str] | None = None,
) -> Iterator[Lease]:
    """Hold one free GPU of the pool for the duration of the block; yield its lease (`index`, `lease_id`).

    `only` restricts the choice (an adopted job must hold the GPU it runs on);
    `skip(index)` returns why a GPU must be passed over (e.g. nvidia-smi shows
    a foreign process); `who` (case_id, beam) is published with the lease.
    """
    broker = _broker(pool)
    if only is None:
        lease = broker.lease(holder, skip)
    else:
        with api_client() as client:
            lease = acquire(client, pool, holder, only, skip)
    lease.announce(LEASED, who)
    release_signal(pool.host).follow()  # to hear who waits by the time we are done
    stopped = False
    try:
        yield lease
    except Stopped as stop:
        if stop.engine_running:  # it goes on: the lease stays taken until the next run adopts the job
            stopped = True
            lease.stop_renewing()
        raise
    finally:
        if not stopped:
            farewell = partial(lease.announce, RELEASED, {**(who or {}), HANDED_OVER: True})
            broker.pass_on(lease, farewell, who)
