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
- The line `prefect.engine` logs, with a traceback, when a flow run's final state is Failed
  ("Engine execution exited with unexpected exception", prefect/flow_engine.py `run_flow`,
  logger `prefect.flow_runs`): it closes every failed case's log and reads as if the engine
  (MOQUI, to a physicist) crashed, though the case chose to end Failed and said why.
- The wording of the set-up lines Prefect's worker and engine log at INFO before a flow run
  starts (`SET_UP_LINES`, loggers `prefect.flow_runs.worker` and `prefect.flow_runs`):
  seven lines that open every case's log; they are kept, at DEBUG.
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractAsyncContextManager
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.context import SyncClientContext
from prefect.exceptions import FailedRun
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


async def mark_flow_run_cancelled(worker: BaseWorker, flow_run: FlowRun, message: str | None = None) -> None:
    """Mark a flow run the worker stopped as Cancelled, as Prefect's worker does (with `message`)."""
    updates = {"message": message} if message else None
    await worker._mark_flow_run_as_cancelled(flow_run, state_updates=updates)


def granted_lease(response: httpx.Response) -> UUID | None:
    """The lease id a slot increment granted; None when the server knew none of the limits."""
    body = response.json()
    if not body.get("limits"):
        return None
    return UUID(body["lease_id"])


ENGINE_EXIT_LINE = "Engine execution exited with unexpected exception"
FLOW_RUN_LOGGER = "prefect.flow_runs"


class _DeliberateFailure(logging.Filter):
    """Drops the engine's closing traceback of a run that returned its Failed state itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.msg == ENGINE_EXIT_LINE and isinstance(error, FailedRun))


def quiet_deliberate_failure() -> None:
    """In a flow run's process: no "unexpected exception" traceback after a Failed state it returned.

    A real crash (any other exception) is still logged with its traceback.
    """
    logger = logging.getLogger(FLOW_RUN_LOGGER)
    if not any(isinstance(f, _DeliberateFailure) for f in logger.filters):
        logger.addFilter(_DeliberateFailure())


# What Prefect's worker (prefect/workers/base.py) and engine (deployment pull steps,
# prefect/deployments/steps/core.py; prefect/flow_engine.py) say before a flow run starts.
SET_UP_LINES = re.compile(
    r"Worker '.*' submitting flow run|Flow run '.*' submitted to infrastructure"
    r"|Running \d+ deployment pull step|Executing deployment step|Deployment step '.*' completed"
    r"|All deployment steps completed|Beginning flow run '"
)
SET_UP_LOGGERS = ("prefect.flow_runs.worker", FLOW_RUN_LOGGER)


class _SetUpAtDebug(logging.Filter):
    """Lowers Prefect's set-up lines to DEBUG: the case's log starts with the case."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and SET_UP_LINES.match(record.getMessage()):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def set_up_lines_at_debug() -> None:
    """In the worker and its flow-run processes: Prefect's set-up lines at DEBUG, not INFO."""
    for name in SET_UP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _SetUpAtDebug) for f in logger.filters):
            logger.addFilter(_SetUpAtDebug())
