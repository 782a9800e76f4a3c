"""Headless Chromium for tests that check what a person sees in a web page (the Prefect UI).

One browser process per `Browser`, driven over the DevTools protocol: open a page, wait
until its rendered text says what is expected (or fail after a deadline with what it
said instead), and save a screenshot to look at. Tests that use it carry the `browser`
marker; tests/conftest.py skips them where no Chromium is installed, except in CI, where
.ci/run installs it and they must run.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from deployments.processes import stop_tree

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
START_SECONDS = 30


def chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, if any."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class Browser:
    """A headless Chromium with one tab; use as a context manager."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        executable = chromium()
        if executable is None:
            raise RuntimeError(f"no browser found (tried {', '.join(BROWSERS)}): apt-get install chromium")
        self.profile = tempfile.TemporaryDirectory(prefix="mqi-browser-")
        self.process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",  # tests run as root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={self.profile.name}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._ids = itertools.count(1)
        self.ws = self._attach()

    def _attach(self) -> ClientConnection:
        """Connect to the tab Chromium opened, once it wrote the port it listens on."""
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if len(lines) >= 2:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its debugging port within {START_SECONDS} s")
            time.sleep(0.1)  # waiting for the file Chromium writes when it listens
        tabs = httpx.get(f"http://127.0.0.1:{lines[0]}/json/list", timeout=10).json()
        [tab] = [tab for tab in tabs if tab["type"] == "page"]
        return connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=10)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        """The page's rendered text, as a person reads it."""
        result = self.call(
            "Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True
        )
        return str(result["result"].get("value", ""))

    def wait_for_text(self, *parts: str, timeout: float = 60) -> str:
        """The page's text once it contains every one of `parts`; else fail showing what it says."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [part for part in parts if part not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout} s the page lacks {missing}; it says:\n{text}")
            time.sleep(0.25)  # the page renders from the API on its own timers

    def click_text(self, label: str) -> None:
        """Click the innermost element whose own text is `label` (a tab, a link, a button)."""
        script = (
            "(() => { const all = [...document.querySelectorAll('*')];"
            f" const hit = all.reverse().find(e => e.textContent.trim() === {json.dumps(label)});"
            " if (!hit) return false; hit.click(); return true; })()"
        )
        result = self.call("Runtime.evaluate", expression=script, returnByValue=True)
        if not result["result"].get("value"):
            raise AssertionError(f"nothing labelled {label!r} to click; the page says:\n{self.text()}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            # Chromium's helpers (in its session) may still write into the profile after the
            # browser process ends: the whole session is stopped before the profile is removed.
            stop_tree(self.process.pid)
            self.process.wait()
            self.profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
