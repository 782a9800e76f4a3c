"""The GPU events on the Prefect server: who leased or released which GPU, and who waits."""

from __future__ import annotations

LEASED = "mqi.gpu.leased"  # payload: case_id, beam, lease_id
RELEASED = "mqi.gpu.released"  # payload: case_id, beam, lease_id, and HANDED_OVER when it was
HANDED_OVER = "handed_over"  # in a release event's payload: the slot went to another beam at once
WAITING = "mqi.gpu.waiting"  # payload: a process, its machine, since when its first beam waits (or null)


def host_prefix(host: str) -> str:
    """The start of every GPU event resource of `host` (mqi.gpu.<host>.)."""
    return f"mqi.gpu.{host}."
