"""Call something at most every so many seconds (progress bars, progress log lines)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def every(
    seconds: float, update: Callable[[T], None], clock: Callable[[], float] = time.monotonic
) -> Callable[[T], None]:
    """`update`, but skipped when it last ran less than `seconds` ago.

    The engine may log thousands of batches; each progress-bar update is a write to the
    Prefect server that every case run shares, and a bar moved every few seconds is enough.
    """
    last: float | None = None

    def maybe(value: T) -> None:
        nonlocal last
        now = clock()
        if last is None or now - last >= seconds:
            last = now
            update(value)

    return maybe
