"""What the Prefect UI of a server `mqi` starts shows: its own API, and a failed case's cause and summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from config import Settings, load_settings
from deployments.cli import main
from deployments.processes import stop_tree
from tasks.prefect_api.internals import ENGINE_EXIT_LINE, SET_UP_LINES
from tests.conftest import write_config
from tests.local_server import free_port
from tests.service_stack import FAST, finished, run_log, small_case, wait_for

MQI = os.path.join(os.path.dirname(sys.executable), "mqi")
START_SECONDS = 300  # a first start migrates its SQLite database; slow on a busy machine


def wait_healthy(process: subprocess.Popen[bytes], api: str, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no server at {api} after {START_SECONDS} s:\n{log.read_text()}"
        time.sleep(0.3)  # polling the health endpoint until the server answers


def test_mqi_server_on_another_port_serves_a_ui_that_talks_to_it(tmp_path):
    """Even with PREFECT_API_URL naming another server (4200), as in a shell set up for the default."""
    port = free_port()
    log = tmp_path / "server.log"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
    }
    with log.open("wb") as out:
        server = subprocess.Popen(
            [MQI, "server", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}/api", log)
        settings = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        stop_tree(server.pid)
        server.wait()


class WebhookReceiver:
    """A local HTTP server that keeps the JSON body of every POST, to wait on."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(204)
                self.end_headers()
                with receiver.arrived:
                    receiver.bodies.append(body)
                    receiver.arrived.notify_all()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120) -> dict:
        """The first body whose subject holds `text`."""
        with self.arrived:
            found = self.arrived.wait_for(
                lambda: [body for body in self.bodies if text in body.get("subject", "")], timeout
            )
        assert found, f"no notification about {text} within {timeout} s; got {self.bodies}"
        return found[0]


@pytest.fixture(scope="module")
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def service(tmp_path_factory, webhook) -> Iterator[tuple[str, Path, Settings]]:
    """`mqi up --port N` with a server of its own (no PREFECT_API_URL), its engine crashing on beam 3,
    failed cases notified to `webhook`."""
    root = tmp_path_factory.mktemp("ui")
    config = write_config(root, {**FAST, "notify": {"webhook_urls": [webhook.url]}})
    port = free_port()
    out = root / "up.out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"MQI_STANDIN_ENGINE_FAULT": "segfault", "MQI_STANDIN_ENGINE_FAULT_KEYS": "3"}
    with out.open("wb") as log:
        up = subprocess.Popen(
            [MQI, "--config", str(config), "up", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for("mqi up to be up", lambda: up.poll() is not None or "is up" in out.read_text(), 300)
        assert up.poll() is None, out.read_text()
        yield f"http://127.0.0.1:{port}", out, load_settings(config, env={})
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            stop_tree(up.pid)
            up.wait()


@pytest.mark.integration
def test_a_failed_case_is_notified_through_the_automation_mqi_up_made(service, webhook, capsys, monkeypatch):
    ui, out, settings = service
    assert "notify:      webhook to 127.0.0.1" in out.read_text()
    bad = small_case(settings.scan_dir, "NOTIFY-1")
    next(bad.glob("RP.*.dcm")).write_bytes(b"not dicom")  # broken, not arriving: it runs and fails
    good = small_case(settings.scan_dir, "NOTIFY-OK")
    body = webhook.wait_for("NOTIFY-1")
    assert body["subject"] == "MQI: case NOTIFY-1 failed"
    message, link = body["body"].splitlines()
    assert message.startswith("NOTIFY-1: not run: RP.") and "not a valid DICOM file" in message
    with temporary_settings({PREFECT_API_URL: f"{ui}/api"}):
        [run] = wait_for("NOTIFY-1's run", lambda: finished(["NOTIFY-1"]))
        [done] = wait_for("NOTIFY-OK's run", lambda: finished([good.name]))
        logs = get_client(sync_client=True).read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
        )
    assert link == f"{ui}/runs/flow-run/{run.id}"
    set_up = [log for log in logs if SET_UP_LINES.match(log.message)]
    assert len(set_up) >= 5 and {log.level for log in set_up} == {logging.DEBUG}, set_up  # the case's log
    first = next(log for log in logs if log.level >= logging.INFO)
    assert first.message.startswith("NOTIFY-1: RP."), first  # ... starts with the case
    assert done.state_type == StateType.COMPLETED
    assert not [b for b in webhook.bodies if "NOTIFY-OK" in b["subject"]]  # a completed case is not notified
    monkeypatch.setenv("COLUMNS", "1000")  # one table row per run, as on a (very) wide terminal
    capsys.readouterr()
    assert main(["--config", str(settings.source), "status", "--api", f"{ui}/api"]) == 0
    assert run.state.message in capsys.readouterr().out  # the cause, not its first 100 characters


@pytest.mark.integration
@pytest.mark.browser
def test_the_ui_shows_a_failed_cases_cause_and_summary_on_its_run_page(service, browser, tmp_path):
    ui, _, settings = service
    assert httpx.get(f"{ui}/ui-settings", timeout=10).json()["api_url"] == f"{ui}/api"
    small_case(settings.scan_dir, "CRASH-UI", beams=2)
    bad = small_case(settings.scan_dir, "BAD-UI")
    plan = next(bad.glob("RP.*.dcm"))
    plan.write_bytes(b"not dicom")  # broken, not arriving (a missing plan waits): it runs and fails
    with temporary_settings({PREFECT_API_URL: f"{ui}/api"}):
        runs = {
            run.name: run for run in wait_for("both runs to end", lambda: finished(["CRASH-UI", "BAD-UI"]))
        }
        logs = {name: run_log(run.id) for name, run in runs.items()}
    crashed = "CRASH-UI: 1/2 beams done; beam 3 (2G090:TX) failed: engine crashed (SIGSEGV, exit 139)"
    not_run = f"BAD-UI: not run: {plan.name}: not a valid DICOM file"
    for name, log in logs.items():  # no closing "unexpected exception" that reads as an engine crash
        assert ENGINE_EXIT_LINE not in log, (name, log)

    browser.open(f"{ui}/runs")  # the UI reaches its own server: the runs are listed
    browser.wait_for_text("CRASH-UI", "BAD-UI")
    browser.screenshot(tmp_path / "runs.png")

    browser.open(f"{ui}/runs/flow-run/{runs['BAD-UI'].id}")
    browser.wait_for_text("Details")
    browser.click_text("Details")
    browser.wait_for_text("State Message", "See More")
    browser.click_text("See More")
    browser.wait_for_text(not_run)
    browser.screenshot(tmp_path / "bad-details.png")

    browser.open(f"{ui}/runs/flow-run/{runs['CRASH-UI'].id}")
    browser.wait_for_text("Artifacts")
    browser.click_text("Artifacts")
    text = browser.wait_for_text("Flow run", "case-crash-ui-summary", "case-crash-ui")
    assert "Flow run: None" not in text
    browser.click_text("case-crash-ui-summary")
    browser.wait_for_text("Case CRASH-UI", crashed, "Beam 3 (2G090:TX) failed", "last lines:")
    browser.screenshot(tmp_path / "crash-summary.png")
