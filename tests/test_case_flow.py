"""The case flow end to end on a Prefect test server, with the stand-in tools."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pydicom
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from config import load_settings
from flows.case import process_case
from standins.sample_case import write_sample_case
from tasks.dose.read import read_dose_gy
from tasks.outcome.summary import artifact_key
from tests.beams import launches
from tests.conftest import write_config
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


def test_case_completes_with_valid_rtdose_per_beam_and_plan(config_file, monkeypatch):
    settings, state, out, launch_log = run_case(config_file, "CASE-OK", monkeypatch)
    assert state.is_completed(), state.message
    assert state.message == "case CASE-OK: 3/3 beams done"
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
