"""Wake GPU waiters the moment a GPU is released, here or anywhere else.

Waiting for a GPU means asking the server whether a limit has a free slot.
Asking often makes hand-offs fast but loads the server that every case run
also writes to; asking rarely leaves GPUs idle between beams. Instead, each
release is an event (`mqi.gpu.released`) and each process follows those
events on the server's event stream: its waiters ask again as soon as a GPU
of their host is released (by this process: at once; by another: when the
event arrives) and otherwise only every `FALLBACK_SECONDS`, which covers
leases that expired because their holder died. A release whose slot went
straight to another beam of its process says so (`handed_over`) and wakes
nobody.

Across processes, a release is first for the process that has waited
longest: each process says when its longest-waiting beam started to wait
(`mqi.gpu.waiting`), and a process that n others have out-waited lets them
ask first (up to TURN_SECONDS each) unless more GPUs than that were
released. Without this, every waiting process asked at once and all but one
lost the race, each loss a failed write on the server's busy database. A
process that waits its turn out and still finds the GPU free forgets those
ahead of it (dead, or stuck), so a crashed process costs one turn. The server
still decides who gets a GPU; the events only say when asking is worthwhile.
The waiting events also name the process's machine, so that a beam ending
there can hand its GPU straight to the process that waited longest
(tasks/gpu/handoff.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import uuid4

from prefect.events import Event, emit_event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL

from tasks.gpu.events import HANDED_OVER, RELEASED, WAITING, host_prefix

logger = get_logger("mqi.gpu")

TURN_SECONDS = 1.0  # how long a process lets each process that has waited longer take a release first
POLL_SECONDS = 0.1  # how often to ask while the event stream is not (yet) followed
FALLBACK_SECONDS = 2.0  # how often to ask anyway while it is
RECONNECT_SECONDS = 2.0
NODE = socket.gethostname()


class ReleaseSignal:
    """A counter of GPU releases on one host, bumped locally and from the server's event stream,
    and since when the beams of other processes wait for one."""

    def __init__(self, host: str) -> None:
        self._host = host
        self.process = uuid4().hex  # names this process in waiting events and its hand-off socket
        self._cond = threading.Condition()
        self._count = 0
        self._others: dict[str, float] = {}  # other process -> since when its longest-waiting beam waits
        self._nearby: set[str] = set()  # the other processes on this machine
        self._following = False
        self._thread: threading.Thread | None = None

    def count(self) -> int:
        with self._cond:
            return self._count

    def released(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    @property
    def following(self) -> bool:
        """Whether the server's release events are being received (else waiters poll often)."""
        with self._cond:
            return self._following

    def wait(self, seen: int, since: float | None = None) -> bool:
        """Return once a release happened after `seen` was read, or when it is time to ask anyway.

        With `since` (when this process's longest-waiting beam began to wait), a release is
        first for the processes that have waited longer: return when more GPUs were released
        than they are, or after they had TURN_SECONDS each. True if that turn ran out.
        """
        self.follow()
        with self._cond:
            timeout = FALLBACK_SECONDS if self._following else POLL_SECONDS
            if not self._cond.wait_for(lambda: self._count != seen, timeout) or since is None:
                return False
            ahead = sum(other < since for other in self._others.values())
            turns = ahead - (self._count - seen) + 1
            if turns <= 0:
                return False
            return not self._cond.wait_for(lambda: self._count - seen > ahead, TURN_SECONDS * turns)

    def announce_waiting(self, since: float | None) -> None:
        """Tell every process since when this one's longest-waiting beam waits (None: no beam waits)."""
        emit_event(
            WAITING,
            resource={"prefect.resource.id": f"{host_prefix(self._host)}waiting"},
            payload={"process": self.process, "node": NODE, "since": since},
        )

    def nearby_ahead_of(self, since: float | None) -> list[str]:
        """The processes on this machine whose first beam has waited longer than `since`, longest first."""
        with self._cond:
            ahead = {p: self._others[p] for p in self._nearby if p in self._others}
            if since is not None:
                ahead = {p: other for p, other in ahead.items() if other < since}
            return sorted(ahead, key=ahead.__getitem__)

    def forget(self, process: str) -> None:
        """Forget a process that is gone (its hand-off socket refused us)."""
        with self._cond:
            self._others.pop(process, None)
            self._nearby.discard(process)

    def forget_ahead_of(self, since: float) -> None:
        """Forget the processes that waited longer but did not take a free GPU in their turn."""
        with self._cond:
            self._others = {process: other for process, other in self._others.items() if other >= since}

    def _heard_waiting(self, payload: dict[str, object]) -> None:
        process, since = str(payload.get("process")), payload.get("since")
        if process == self.process:
            return
        with self._cond:
            if isinstance(since, int | float):
                self._others[process] = float(since)
                if payload.get("node") == NODE:
                    self._nearby.add(process)
            else:
                self.forget(process)  # no beam of it waits any more

    def follow(self) -> None:
        """Start following the server's release events (once per process and server)."""
        with self._cond:
            if self._thread is None:  # with our context: the same Prefect settings and server
                self._thread = threading.Thread(
                    target=contextvars.copy_context().run,
                    args=(asyncio.run, self._follow(datetime.now(UTC))),  # from now on
                    name=f"mqi-gpu-releases-{self._host}",
                    daemon=True,
                )
                self._thread.start()

    def _set_following(self, value: bool) -> None:
        with self._cond:
            self._following = value

    def _heard(self, event: Event) -> None:
        if event.event == WAITING:
            self._heard_waiting(event.payload)
        elif not event.payload.get(HANDED_OVER):  # else the slot is still taken
            self.released()

    def _connected(self, following: bool) -> None:
        self._set_following(following)
        if not following:
            self.released()  # a release may have been missed while disconnected

    async def _follow(self, since: datetime) -> None:
        await follow_gpu_events(self._host, [RELEASED, WAITING], since, self._heard, self._connected)


async def follow_gpu_events(
    host: str,
    names: list[str],
    since: datetime,
    heard: Callable[[Event], None],
    connected: Callable[[bool], None],
) -> None:
    """Forever: pass every event `names` of `host`'s GPUs to `heard`, from `since` on, reconnecting.

    `connected(True)` once the stream is followed, `connected(False)` when it was lost (events
    may have been missed meanwhile).
    """
    while True:
        wanted = EventFilter(  # from `since` on: the server first sends what we missed
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=names),
            resource=EventResourceFilter(id_prefix=[host_prefix(host)]),
        )
        try:
            async with get_events_subscriber(filter=wanted, reconnection_attempts=0) as events:
                connected(True)
                async for event in events:
                    heard(event)
        except Exception as error:  # the server is down or restarting: poll meanwhile
            logger.debug("GPU events of %s not followed: %s", host, error)
        since = datetime.now(UTC)
        connected(False)
        await asyncio.sleep(RECONNECT_SECONDS)


_signals: dict[tuple[str, str], ReleaseSignal] = {}
_signals_lock = threading.Lock()


def release_signal(host: str) -> ReleaseSignal:
    """The process's release signal for `host` on the current Prefect server."""
    key = (str(PREFECT_API_URL.value()), host)
    with _signals_lock:
        return _signals.setdefault(key, ReleaseSignal(host))
