"""Every use of Prefect's private internals, in one place, each checked by tests/test_prefect_internals.py.

Prefect's public API does not cover four things this project needs; each is reached here
and nowhere else, so an upgrade that renames one fails those tests loudly instead of
silently changing behaviour. The dependency is pinned to the Prefect minor version the
tests prove (pyproject.toml).

- A client context whose client Prefect's own calls reuse: Prefect matches a context's
  client to a `get_client(sync_client=True)` call by the private `_httpx_settings` of the
  context (prefect/client/orchestration, prefect/context.py).
- The process worker's client and exit stack (`BaseWorker._client`, `_exit_stack`): the
  warm worker swaps in a client that retries a busy server at once.
- `BaseWorker._mark_flow_run_as_cancelled`: how the worker marks a run it stopped.
- The body of a lease increment: `increment_concurrency_slots_with_lease` returns the raw
  httpx response, whose JSON holds `limits` and `lease_id`.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.context import SyncClientContext
from prefect.workers.base import BaseWorker


def share_client_context(context: SyncClientContext) -> SyncClientContext:
    """Mark `context`'s client as made without httpx settings, so Prefect's own calls reuse it."""
    context._httpx_settings = None
    return context


async def replace_worker_client(
    worker: BaseWorker, client: AbstractAsyncContextManager[PrefectClient]
) -> None:
    """After `worker.setup()`: make `client` (entered on the worker's exit stack) the worker's client."""
    worker._client = await worker._exit_stack.enter_async_context(client)


async def mark_flow_run_cancelled(worker: BaseWorker, flow_run: FlowRun) -> None:
    """Mark a flow run the worker stopped as Cancelled, as Prefect's worker does."""
    await worker._mark_flow_run_as_cancelled(flow_run)


def granted_lease(response: httpx.Response) -> UUID | None:
    """The lease id a slot increment granted; None when the server knew none of the limits."""
    body = response.json()
    if not body.get("limits"):
        return None
    return UUID(body["lease_id"])
