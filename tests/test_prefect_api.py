"""The busy-retrying transport against a real HTTP server that answers 503 for a while."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from uuid import uuid4

import certifi
import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_URL,
    PREFECT_CLIENT_CSRF_SUPPORT_ENABLED,
    PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED,
    temporary_settings,
)

from tasks.prefect_api import client as prefect_api
from tasks.prefect_api.client import AsyncBusyRetryTransport, BusyRetryTransport

END = "-----END CERTIFICATE-----\n"


class BusyServer(ThreadingHTTPServer):
    """Answers `busy` requests with 503, then `then`; keeps every request body it got."""

    def __init__(self, busy: int, then: int) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.busy, self.then = busy, then
        self.bodies: list[bytes] = []


class Handler(BaseHTTPRequestHandler):
    server: BusyServer

    def do_POST(self) -> None:
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        code = 503 if len(self.server.bodies) <= self.server.busy else self.server.then
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    monkeypatch.setattr(prefect_api, "BUSY_RETRIES", 5)
    monkeypatch.setattr(prefect_api, "BUSY_PAUSE_SECONDS", 0.001)
    servers: list[BusyServer] = []

    def start(busy: int, then: int = 200) -> tuple[BusyServer, httpx.Client]:
        server = BusyServer(busy, then)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        host, port = server.server_address
        return server, httpx.Client(base_url=f"http://{host}:{port}", transport=BusyRetryTransport())

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_503_is_sent_again_with_the_same_body(serve):
    server, client = serve(busy=4)
    response = client.post("/v2/concurrency_limits/increment-with-lease", json={"names": ["gpu-a-0"]})
    assert response.status_code == 200
    assert server.bodies == [b'{"names":["gpu-a-0"]}'] * 5


def test_a_lasting_503_is_handed_back_after_the_quick_tries(serve):
    server, client = serve(busy=100)
    assert client.post("/x", json={}).status_code == 503
    assert len(server.bodies) == 5


def test_the_async_transport_does_the_same(serve):
    server, client = serve(busy=4)
    host, port = server.server_address

    async def post() -> httpx.Response:
        transport = AsyncBusyRetryTransport()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", transport=transport) as http:
            return await http.post("/x", json={"slots": 1})

    assert asyncio.run(post()).status_code == 200
    assert server.bodies == [b'{"slots":1}'] * 5


@pytest.mark.parametrize("code", [200, 423, 500])
def test_other_answers_are_returned_at_once(serve, code):
    server, client = serve(busy=0, then=code)
    assert client.post("/x", json={}).status_code == code
    assert len(server.bodies) == 1


def test_clients_share_one_tls_context_built_from_prefects_settings(monkeypatch, tmp_path):
    """Prefect loads the whole CA bundle for every client (~45 ms of CPU); ours load it once."""
    built: list[ssl.SSLContext] = []
    create = ssl.create_default_context

    def counted(*args, **kwargs) -> ssl.SSLContext:
        built.append(create(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    prefect_api._tls.cache_clear()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        for _ in range(3):
            with prefect_api.api_client():
                pass
        prefect_api.async_api_client()
        assert len(built) == 1
        assert len(built[0].get_ca_certs()) > 100  # certifi's bundle, as Prefect's default

        one_ca = tmp_path / "clinic-ca.pem"
        one_ca.write_text(Path(certifi.where()).read_text().split("-----END CERTIFICATE-----")[0] + END)
        with temporary_settings({PREFECT_API_SSL_CERT_FILE: str(one_ca)}):
            with prefect_api.api_client():
                pass
        assert len(built) == 2
        assert len(built[1].get_ca_certs()) == 1  # the configured CA file, not the bundle


def test_prefects_own_calls_in_a_flow_run_share_its_busy_retrying_client(serve):
    server, _ = serve(busy=4)
    host, port = server.server_address
    api = {  # a bare HTTP server: no version or CSRF-token endpoints
        PREFECT_API_URL: f"http://{host}:{port}/api",
        PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED: False,
        PREFECT_CLIENT_CSRF_SUPPORT_ENABLED: False,
    }
    with temporary_settings(api), prefect_api.flow_run_client_context() as context:
        client = get_client(sync_client=True)  # as Prefect's task engine, artifacts and results ask
        assert client is context.client
        client.release_concurrency_slots_with_lease(uuid4())  # 503 four times, then 200
    assert len(server.bodies) == 5
