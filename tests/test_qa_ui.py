"""The beam's QA picture is rendered on its artifact page in the Prefect UI (headless Chromium)."""

from __future__ import annotations

import json
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.case import process_case
from tasks.outcome.summary import artifact_key
from tests.conftest import write_config
from tests.local_server import LocalServer, pointed_at
from tests.test_qa_case import case_with_references

pytestmark = pytest.mark.browser

IMAGES = "JSON.stringify([...document.images].map(i => [i.src.slice(0, 21), i.complete, i.naturalWidth]))"


def test_the_qa_picture_renders_on_the_artifact_page(tmp_path, browser, monkeypatch):
    server = LocalServer(tmp_path / "prefect")
    server.home.mkdir()
    ui = f"http://127.0.0.1:{server.port}"
    monkeypatch.setenv("PREFECT_SERVER_UI_API_URL", f"{ui}/api")  # its UI asks this server, not 4200
    server.start()
    try:
        with pointed_at(server):
            config = write_config(tmp_path)
            case_dir, _ = case_with_references(config, "QA-UI")
            state = process_case(str(case_dir), str(config), return_state=True)
            assert state.is_completed() and "QA: 3/3 pass" in state.message, state.message
            with get_client(sync_client=True) as client:
                [artifact] = client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        key=ArtifactFilterKey(any_=[f"{artifact_key('QA-UI')}-qa-beam-02"])
                    )
                )
        browser.open(f"{ui}/artifacts/artifact/{artifact.id}")
        browser.wait_for_text("beam 2 (1G000:TX): QA PASS", "points pass (action level 95 %)")
        deadline = time.monotonic() + 30
        while True:
            found = browser.call("Runtime.evaluate", expression=IMAGES, returnByValue=True)
            images = json.loads(found["result"]["value"])
            drawn = [image for image in images if image[0] == "data:image/png;base64" and image[2] > 0]
            if drawn or time.monotonic() > deadline:
                break
            time.sleep(0.25)  # the page decodes the image after rendering the markdown
        browser.screenshot(tmp_path / "qa-artifact.png")
        assert drawn == [["data:image/png;base64", True, 880]], f"images on the page: {images}"
    finally:
        server.stop()
