"""A Prefect API client that asks again within milliseconds while the server's SQLite is busy.

On SQLite, a write transaction that meets another write fails at once
(SQLITE_BUSY), and the Prefect server answers 503; Prefect's client then asks
again only after 2, 4, 8, ... s. Measured with 10 cases on 4 GPUs: a third of
the GPU slot increments got a 503 (up to 30 s lost per increment, GPUs idle
meanwhile), and so did case-run creations. This client's transport retries a
503 itself, after a few milliseconds, up to BUSY_RETRIES times; what lasts
longer still meets the client's own retries. A 503 means the server's
transaction was rolled back, so asking again does nothing twice.

Used for GPU leases, case-run creation, the warm worker and the flow-run
processes it starts (deployments/warm_worker.py).

Clients are cheap here: Prefect builds a new TLS context for every client,
loading the whole CA bundle (about 45 ms of CPU), even for an http:// server.
Measured with 10 cases on 4 GPUs, that was 70 % of the case runs' CPU on a
2-core host. These clients share one TLS context per process, built from the
same settings, and a flow run's own calls reuse its engine's client
(`flow_run_client_context`).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import certifi
import httpx
from prefect.client.orchestration import PrefectClient, SyncPrefectClient, get_client
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

from tasks.prefect_api.internals import share_client_context


def server_unavailable(error: BaseException) -> bool:
    """Down, restarting or overloaded (a refused connection, a timeout, a 5xx): a later try may succeed."""
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


BUSY_RETRIES = 40  # quick tries per request before the client's own (slow) retries take over
BUSY_PAUSE_SECONDS = 0.05  # mean pause between two tries


def _pauses() -> Iterator[float]:
    """The pause before each quick try after a 503: random, so that busy writers interleave."""
    for _ in range(BUSY_RETRIES - 1):
        yield random.uniform(0, 2 * BUSY_PAUSE_SECONDS)


class BusyRetryTransport(httpx.HTTPTransport):
    """HTTP transport that sends a request again, after a short pause, while it gets 503."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for pause in _pauses():
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(pause)
        return super().handle_request(request)


class AsyncBusyRetryTransport(httpx.AsyncHTTPTransport):
    """The same for async clients."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for pause in _pauses():
            response = await super().handle_async_request(request)
            if response.status_code != 503:
                return response
            await response.aclose()
            await asyncio.sleep(pause)
        return await super().handle_async_request(request)


@lru_cache(maxsize=8)
def _tls(cert_file: str, insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cert_file)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_context() -> ssl.SSLContext:
    """The TLS context Prefect would build for a client (same settings), built once per process."""
    insecure = bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value())
    return _tls(PREFECT_API_SSL_CERT_FILE.value() or certifi.where(), insecure)


def busy_retry_settings() -> dict[str, Any]:
    """httpx settings for a sync Prefect client (3 connection retries, as Prefect's own)."""
    tls = tls_context()
    return {"transport": BusyRetryTransport(retries=3, verify=tls), "verify": tls}


def api_client() -> SyncPrefectClient:
    """A sync client of the current Prefect API that retries a busy server (a context manager)."""
    return get_client(sync_client=True, httpx_settings=busy_retry_settings())


def async_api_client() -> PrefectClient:
    """An async client of the current Prefect API that retries a busy server."""
    tls = tls_context()
    transport = AsyncBusyRetryTransport(retries=3, verify=tls)
    return get_client(httpx_settings={"transport": transport, "verify": tls})


@contextmanager
def flow_run_client_context() -> Iterator[SyncClientContext]:
    """A client context for a flow run's engine whose client Prefect's own calls use too.

    Prefect's `get_client(sync_client=True)` returns the context's client only if it was
    made with the same httpx settings, i.e. none; otherwise every task run, artifact and
    result lookup builds a client of its own. This context's client retries a busy
    server, and is marked as made with none, so that all of those calls share it.
    """
    context = share_client_context(SyncClientContext(httpx_settings=busy_retry_settings()))
    with context:
        yield context
