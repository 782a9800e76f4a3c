"""A process being stopped (SIGTERM) leaves its engine jobs running for the next run of the case.

When the service stops, every case-run process gets SIGTERM. Its beams' engine jobs are
detached: they go on, and the next run of the case adopts them. So from the signal on,
a beam of this process takes no GPU, launches nothing, and does not give back the lease
of a GPU whose engine still runs (another case would launch beside that engine); every
beam ends at once with `Stopped`, so that the process can report its run Crashed well
within the grace period instead of being killed still following its jobs.

Plain code, no Prefect: the flow installs the handler (chained to the one in place, i.e.
Prefect's, which turns SIGTERM into the run's Crashed state); waits register a wake-up.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_stopping = threading.Event()
_wake_ups: list[Callable[[], None]] = []
_lock = threading.Lock()


class Stopped(BaseException):
    """This process is being stopped: not an error of the beam, and never retried.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` takes it for a
    failure of the step it interrupts. `engine_running`: it interrupted a beam whose
    engine runs on the GPU it holds, so that GPU's lease must stay taken.
    """

    def __init__(self, message: str, engine_running: bool = False) -> None:
        super().__init__(message)
        self.engine_running = engine_running


def stopping() -> bool:
    return _stopping.is_set()


def check(before: str, engine_running: bool = False) -> None:
    """Raise Stopped if this process is being stopped; `before` says what is not done."""
    if _stopping.is_set():
        raise Stopped(f"the process is being stopped; not {before}", engine_running)


def on_stop(wake: Callable[[], None]) -> None:
    """Call `wake` when a stop is asked for (to end a wait at once); at once if it was."""
    with _lock:
        _wake_ups.append(wake)
    if _stopping.is_set():
        wake()


def request_stop() -> None:
    """From now on every check() raises; every registered wait is woken."""
    _stopping.set()
    with _lock:
        wakes = list(_wake_ups)
    for wake in wakes:
        wake()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """For the block (in the main thread; elsewhere nothing): SIGTERM asks for a stop, then
    goes on to the handler that was in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handle(signum: int, frame: FrameType | None) -> None:
        request_stop()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
