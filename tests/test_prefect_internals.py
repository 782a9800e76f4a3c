"""Each private Prefect internal the project uses (tasks/prefect_api/internals.py), against a real server.

If a Prefect upgrade renames or reshapes one of them, the test of that one fails here, by
name, instead of the project silently losing the behaviour it relies on.
"""

from __future__ import annotations

import asyncio
import inspect
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import StateType
from prefect.context import SyncClientContext
from prefect.states import Cancelling
from prefect.workers.base import BaseWorker
from prefect.workers.process import ProcessWorker

from tasks.prefect_api.client import async_api_client, busy_retry_settings
from tasks.prefect_api.internals import (
    granted_lease,
    mark_flow_run_cancelled,
    replace_worker_client,
    share_client_context,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


@flow(name="internals-probe")
def probe() -> None:
    """A flow to create runs of; never run."""


def test_a_shared_client_context_is_the_one_prefects_own_calls_get():
    context = SyncClientContext(httpx_settings=busy_retry_settings())
    assert context._httpx_settings is not None  # the private attribute still exists under this name
    with share_client_context(context):
        assert get_client(sync_client=True) is context.client
    with SyncClientContext(httpx_settings=busy_retry_settings()) as unshared:
        assert get_client(sync_client=True) is not unshared.client  # what the hook changes


def test_the_workers_client_is_replaced_and_used(tmp_path):
    async def check() -> None:
        async with ProcessWorker(work_pool_name=f"internals-{uuid4().hex[:8]}") as worker:
            before = worker.client
            await replace_worker_client(worker, async_api_client())
            assert worker.client is not before
            assert await worker.client.api_healthcheck() is None  # the new client talks to the server

    asyncio.run(check())


def test_a_stopped_flow_run_is_marked_cancelled():
    assert inspect.iscoroutinefunction(BaseWorker._mark_flow_run_as_cancelled)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(probe)
        client.set_flow_run_state(run.id, Cancelling(message="asked"), force=True)
        run = client.read_flow_run(run.id)

    async def mark() -> None:
        async with ProcessWorker(work_pool_name=f"internals-{uuid4().hex[:8]}") as worker:
            await mark_flow_run_cancelled(worker, run)

    asyncio.run(mark())
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state_type == StateType.CANCELLED


def test_a_lease_increment_names_its_lease_or_no_limit():
    name = f"internals-{uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        granted = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=60
        )
        lease_id = granted_lease(granted)
        assert isinstance(lease_id, UUID)
        client.release_concurrency_slots_with_lease(lease_id)
        unknown = client.increment_concurrency_slots_with_lease(
            names=[f"{name}-missing"], slots=1, mode="concurrency", lease_duration=60
        )
        assert granted_lease(unknown) is None
