"""The case flow end to end on a Prefect test server, with the stand-in tools."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_UI_URL

from config import load_settings
from flows.case import process_case
from standins.sample_case import write_sample_case
from tasks.dose.read import read_dose_gy
from tasks.outcome.summary import artifact_key
from tests.beams import launches
from tests.case_edits import tree_state
from tests.conftest import write_config
from tests.service_stack import run_log, wait_for
from tests.sshd import FIXTURES

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]


def run_case(config_file: Path, case_id: str, monkeypatch, **env: str):
    settings = load_settings(config_file, env={})
    case_dir = write_sample_case(settings.scan_dir, case_id, beams=3)
    launch_log = config_file.parent / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    state = process_case(str(case_dir), str(config_file), return_state=True)
    return settings, state, settings.output_dir(case_id), launch_log


def read_artifacts(key: str) -> list:
    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    return asyncio.run(read())


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_case_completes_with_valid_rtdose_per_beam_and_plan(either_database, config_file, monkeypatch):
    settings, state, out, launch_log = run_case(config_file, "CASE-OK", monkeypatch)
    assert state.is_completed(), state.message
    assert state.message == "CASE-OK: 3/3 beams done"
    files = sorted(p.name for p in out.glob("*.dcm"))
    assert files == ["RTDOSE_beam02.dcm", "RTDOSE_beam03.dcm", "RTDOSE_beam04.dcm", "RTDOSE_plan.dcm"]
    total = 0
    for name in files:
        path = out / name
        assert dciodvfy_errors(path) == [], name
        ds = pydicom.dcmread(path)
        assert ds.Modality == "RTDOSE" and float(ds.DoseGridScaling) > 0
        assert ds.DoseSummationType == ("PLAN" if name == "RTDOSE_plan.dcm" else "BEAM")
        prov = json.loads(path.with_name(path.stem + ".provenance.json").read_text())
        assert prov["rtdose_sha256"] and prov["beams"][0]["input_hash"]
        if name != "RTDOSE_plan.dcm":
            total = total + read_dose_gy(path)
            assert prov["beams"][0]["gpu"] in settings.backend.gpus
    plan = read_dose_gy(out / "RTDOSE_plan.dcm")
    assert abs(plan - total).max() <= float(pydicom.dcmread(out / "RTDOSE_plan.dcm").DoseGridScaling) * 2
    assert plan.max() > 0
    assert launches(launch_log) == {"2": 1, "3": 1, "4": 1}
    table = read_artifacts(artifact_key("CASE-OK"))
    assert table and table[0].type == "table"
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert [row["state"] for row in rows] == ["Completed"] * 3


def test_gpu_that_nvidia_smi_shows_busy_with_a_foreign_process_is_not_used(tmp_path, monkeypatch):
    smi = tmp_path / "smi"
    smi.mkdir()
    (smi / "gpus.csv").write_text(
        "0, GPU-aaa, NVIDIA A100, 40960, 30000, 10960, 50, 90\n"
        "1, GPU-bbb, NVIDIA A100, 40960, 0, 40960, 30, 0\n"
    )
    (smi / "apps.csv").write_text("31337, GPU-aaa, /home/someone/train.py, 30000\n")
    monkeypatch.setenv("FAKE_NVIDIA_SMI_DIR", str(smi))
    config = write_config(tmp_path, {"backend": {"nvidia_smi": ["sh", str(FIXTURES / "nvidia-smi")]}})
    _, state, _, launch_log = run_case(config, "CASE-FOREIGN", monkeypatch)
    assert state.is_completed(), state.message
    gpus = [
        json.loads(line)["gpu"]
        for line in launch_log.read_text().splitlines()
        if json.loads(line)["tool"] == "engine" and json.loads(line)["event"] == "start"
    ]
    assert gpus == [1, 1, 1]


@pytest.mark.parametrize("change", ["file added", "folder renamed"])
def test_a_case_folder_changed_under_its_run_fails_it_before_the_next_gpu_time(tmp_path, monkeypatch, change):
    """Issue 16: a folder renamed while its case ran was noticed only at conversion, after the GPU time."""
    config = write_config(tmp_path, {"backend": {"host": "changed", "gpus": [0]}})  # one beam at a time
    settings = load_settings(config, env={})
    case_dir = write_sample_case(settings.scan_dir, "CASE-CHANGED", beams=3)
    renamed = case_dir.with_name("CASE-CHANGED-again")
    launch_log = tmp_path / "launches.jsonl"
    monkeypatch.setenv("MQI_STANDIN_LAUNCH_LOG", str(launch_log))
    hold = tmp_path / "hold-engine"  # the first engine runs until the change is made
    hold.touch()
    monkeypatch.setenv("MQI_STANDIN_ENGINE_HOLD", str(hold))
    before = tree_state(case_dir)

    def change_while_the_first_beam_runs() -> None:
        try:
            wait_for("the first engine launch", lambda: launches(launch_log), timeout=120)
            if change == "file added":
                (case_dir / "notes.txt").write_text("a second export\n")
            else:
                case_dir.rename(renamed)
        finally:
            hold.unlink()

    changer = threading.Thread(target=change_while_the_first_beam_runs)
    changer.start()
    state = process_case(str(case_dir), str(config), return_state=True)
    changer.join()
    [first] = launches(launch_log)
    assert launches(launch_log) == {first: 1}  # no GPU time spent after the change
    assert state.is_failed() and "CASE-CHANGED: 1/3 beams done" in state.message, state.message
    cause = (
        "the case folder changed since discovery (added notes.txt)"
        if change == "file added"
        else "the case folder is gone since discovery"
    )
    assert state.message.count(cause) == 2, state.message  # both beams that waited for the GPU
    out = settings.output_dir("CASE-CHANGED")
    assert sorted(path.name for path in out.glob("*.dcm")) == [f"RTDOSE_beam{int(first):02d}.dcm"]
    # converted after the change, from the run's plan copy; the provenance names the plan it came from
    plan = (
        next(case_dir.glob("RP.*.dcm")).name
        if change == "file added"
        else next(renamed.glob("RP.*.dcm")).name
    )
    copy = settings.work_dir("CASE-CHANGED") / "plan" / plan
    assert copy.is_file() and [path.name for path in copy.parent.iterdir()] == [plan]
    provenance = json.loads((out / f"RTDOSE_beam{int(first):02d}.provenance.json").read_text())
    assert provenance["plan"] == str(case_dir / plan)
    after = tree_state(case_dir if change == "file added" else renamed)
    unchanged = {path: entry for path, entry in after.items() if path not in (".", "./notes.txt")}
    assert unchanged == {path: entry for path, entry in before.items() if path != "."}  # the added file aside


def flow_run_artifacts(flow_run_id) -> list:
    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    return asyncio.run(read())


def final_log(state) -> str:
    """The run's log once the flow's closing line ("Finished in state Failed('P3: ...')") is on the
    server, else "": the logs reach it in batches, after the run has ended."""
    log = run_log(state.state_details.flow_run_id)
    return log if f"Finished in state {state.name}({state.message!r})" in log else ""


def test_a_beam_that_crashes_every_time_ends_the_case_with_one_line_and_a_full_table(
    config_file, monkeypatch
):
    _, state, _, _ = run_case(
        config_file,
        "P3",
        monkeypatch,
        MQI_STANDIN_ENGINE_FAULT="segfault",
        MQI_STANDIN_ENGINE_FAULT_KEYS="3",
    )
    assert state.is_failed()
    assert state.message == (
        "P3: 2/3 beams done; beam 3 (2G090:TX) failed after 2 attempts: engine crashed (SIGSEGV, exit 139)"
    )
    artifacts = {artifact.key: artifact for artifact in flow_run_artifacts(state.state_details.flow_run_id)}
    table, summary = artifacts[artifact_key("P3")], artifacts[f"{artifact_key('P3')}-summary"]
    assert table.task_run_id is None and summary.task_run_id is None  # the run's own, not the report task's
    rows = {row["beam"]: row for row in json.loads(table.data)}
    assert rows[3]["state"] == "Failed" and rows[3]["attempts"] == 2 and rows[3]["gpu"] in (0, 1)
    assert rows[3]["duration_s"] is not None and rows[3]["duration_s"] >= 0
    assert "engine-attempt-2.log" in summary.data and "last lines:" in summary.data  # the whole error
    log = wait_for("the run's last lines to reach the server", lambda: final_log(state))
    last = [line for line in log.splitlines() if "summary:" in line]
    assert last == [f"{state.message}; summary: {PREFECT_UI_URL.value()}/artifacts/artifact/{summary.id}"]


def test_a_folder_without_a_plan_fails_with_one_line_and_a_summary_not_a_traceback(config_file):
    settings = load_settings(config_file, env={})
    case_dir = write_sample_case(settings.scan_dir, "BAD1", beams=1)
    next(case_dir.glob("RP.*.dcm")).unlink()
    storage = PREFECT_LOCAL_STORAGE_PATH.value()
    stored = set(storage.iterdir()) if storage.exists() else set()
    state = process_case(str(case_dir), str(config_file), return_state=True)
    assert (set(storage.iterdir()) if storage.exists() else set()) == stored  # nothing outside the data root
    assert state.is_failed()
    assert state.message == (
        "BAD1: not run: no RTPLAN found in the case folder (DICOM headers read there and one level below)"
    )
    [summary] = flow_run_artifacts(state.state_details.flow_run_id)
    assert summary.key == f"{artifact_key('BAD1')}-summary" and summary.task_run_id is None
    assert "**BAD1: not run: no RTPLAN found" in summary.data and str(case_dir) in summary.data
    log = wait_for("the run's last lines to reach the server", lambda: final_log(state))
    assert "Traceback" not in log, log
    problem = "BAD1: .: no RTPLAN found in the case folder (DICOM headers read there and one level below)"
    assert [line for line in log.splitlines() if line.startswith("BAD1: .:")] == [problem]  # logged once
