"""A case with TPS references end to end: verdicts in the artifacts and the message, pictures, and a
failed QA that leaves the run Completed but tagged, announced and at the top of the summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import pydicom
import pytest
from prefect.client.orchestration import get_client

from config import load_settings
from flows.case import process_case
from standins.sample_case import write_sample_case
from standins.tps_reference import write_tps_references
from tasks.dose.outputs import water_surface_mm
from tasks.gamma import QA_FAIL_TAG
from tasks.moqui.inputs import dose_grid
from tasks.outcome.summary import artifact_key
from tests.conftest import write_config
from tests.service_stack import events, wait_for
from tests.test_case_flow import read_artifacts

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


def case_with_references(config: Path, case_id: str) -> tuple[Path, list[Path]]:
    """A sample case with RayStation-like TPS doses (EFFECTIVE, RBE 1.1), its marker written last."""
    settings = load_settings(config, env={})
    case_dir = write_sample_case(settings.scan_dir, case_id, beams=3, ready_marker=None)
    grid = dose_grid(settings, settings.engine_profile)
    written = write_tps_references(
        case_dir, grid, surface_mm=water_surface_mm(settings), dose_type="EFFECTIVE", rbe=1.1
    )
    (case_dir / settings.case.ready_marker).touch()
    return case_dir, written


def test_a_case_with_tps_references_reports_each_beams_verdict(tmp_path):
    config = write_config(tmp_path)
    case_dir, references = case_with_references(config, "QA-E2E")
    hot = pydicom.dcmread(references[2])  # beam 4's TPS dose 6 % hotter: it must fail 2 %/2 mm
    hot.DoseGridScaling = f"{float(hot.DoseGridScaling) * 1.06:.10g}"
    hot.save_as(references[2])
    state = process_case(str(case_dir), str(config), return_state=True)

    assert state.is_completed(), state.message  # the dose was delivered as recalculated
    match = re.fullmatch(
        r"QA-E2E: 3/3 beams done; QA: 2/3 pass \(([\d.]+) %, ([\d.]+) %, ([\d.]+) %\); FAIL: beam 4",
        state.message,
    )
    assert match, state.message
    passed = [float(rate) for rate in match.groups()[:2]]
    assert all(rate >= 95.0 for rate in passed) and float(match.group(3)) < 95.0

    settings = load_settings(config, env={})
    out = settings.output_dir("QA-E2E")
    for number in (2, 3, 4):
        picture = out / f"RTDOSE_beam{number:02d}_qa.png"
        assert matplotlib.image.imread(picture).shape[:2] == (720, 880)  # a whole PNG, as drawn
        qa = json.loads((out / f"RTDOSE_beam{number:02d}.provenance.json").read_text())["qa"]
        assert qa["verdict"] == ("fail" if number == 4 else "pass")
        assert qa["reference"] == str(references[number - 2]) and qa["points"] > 100
        assert qa["criteria"] == "2 %/2 mm global, 5 % cutoff, 3-D"
    assert matplotlib.image.imread(out / "QA_report.png").ndim == 3

    key = artifact_key("QA-E2E")
    [table] = read_artifacts(key)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["qa"].split()[0] for row in rows] == ["pass", "pass", "FAIL"]
    [summary] = read_artifacts(f"{key}-summary")
    assert summary.data.startswith("# Case QA-E2E\n\n> **QA FAILED: QA: 2/3 pass")
    [beam4] = read_artifacts(f"{key}-qa-beam-04")
    assert "QA FAIL" in beam4.data and "](data:image/png;base64,iVBORw0KGgo" in beam4.data

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert QA_FAIL_TAG in run.tags
    [event] = wait_for("the QA event", lambda: events("mqi.case.qa.failed", "mqi.case.QA-E2E") or None, 60)
    assert event.payload["verdict"] == state.message.split("; ", 1)[1]
    assert [beam["beam_number"] for beam in event.payload["beams"]] == [4]


def test_a_case_without_references_runs_and_says_so_per_beam(tmp_path):
    config = write_config(tmp_path)
    settings = load_settings(config, env={})
    case_dir = write_sample_case(settings.scan_dir, "QA-NONE", beams=1)
    state = process_case(str(case_dir), str(config), return_state=True)
    assert state.is_completed() and state.message == "QA-NONE: 1/1 beams done"
    [table] = read_artifacts(artifact_key("QA-NONE"))
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["qa"] for row in rows] == ["no reference"]
    with get_client(sync_client=True) as client:
        assert QA_FAIL_TAG not in client.read_flow_run(state.state_details.flow_run_id).tags
