"""The `mqi` command line: inspect, config check, sample-case, run."""

from __future__ import annotations

import json
import shutil

import pytest

from deployments.cli import main
from standins.sample_case import write_sample_case
from tests.conftest import write_config


def test_inspect_json_describes_a_good_case(tmp_path, capsys):
    case_dir = write_sample_case(tmp_path, "P 1", beams=2)
    assert main(["inspect", str(case_dir), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["case_id"] == "P 1" and found["problems"] == []
    assert [(b["beam_number"], b["layers"]) for b in found["beams"]] == [(2, 6), (3, 6)]
    assert all(b["delivery"] and b["beam_name"] for b in found["beams"])
    assert [(e["beam_number"], "setup" in e["reason"].lower()) for e in found["excluded"]] == [(1, True)]


def test_inspect_reports_problems_with_nonzero_exit(tmp_path, capsys):
    case_dir = write_sample_case(tmp_path, "P2", beams=2)
    delivery = sorted(p for p in case_dir.iterdir() if p.is_dir())[0]
    shutil.rmtree(delivery)
    assert main(["inspect", str(case_dir), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any("no delivery folder" in p for p in problems)
    assert main(["inspect", str(case_dir)]) == 1  # the human-readable form too
    assert "no delivery folder" in capsys.readouterr().err


def test_config_check_names_the_bad_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  retries: -1\n  colour: red\n")
    assert main(["--config", str(bad), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert "engine.colour: unknown key" in err and "engine.retries" in err


def test_config_check_prints_effective_config(config_file, capsys):
    assert main(["--config", str(config_file), "config", "check"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "gpu-test-0" in out


def test_config_check_describes_every_setting(config_file, capsys):
    assert main(["--config", str(config_file), "config", "check"]) == 0
    out = capsys.readouterr().out
    assert "engine.timeout_seconds: 120.0  # A beam's engine run is killed after this." in out
    assert "tps.phantom.dims: [40, 40, 40]  # Voxels in x, y, z." in out
    assert main(["--config", str(config_file), "config", "check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"]["host"] == "test"


def test_inspect_does_not_ask_for_a_marker_where_a_quiet_period_makes_cases_ready(tmp_path, capsys):
    config = write_config(tmp_path, {"sensor": {"quiet_seconds": 30}})
    case_dir = write_sample_case(tmp_path, "QUIET", beams=1, ready_marker=None)
    assert main(["--config", str(config), "inspect", str(case_dir)]) == 0
    out = capsys.readouterr().out
    assert "ready marker: not required" in out and "30 s without changes" in out and "MISSING" not in out
    assert main(["inspect", str(case_dir)]) == 0  # the default config asks for the marker
    assert "ready marker _CASE_READY: MISSING" in capsys.readouterr().out


def test_sample_case_command(tmp_path, capsys):
    assert main(["sample-case", str(tmp_path), "--case-id", "S1", "--beams", "2"]) == 0
    assert (tmp_path / "S1" / "_CASE_READY").exists()


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_server")
def test_run_prints_outputs_and_final_state(config_file, tmp_path, capsys):
    case_dir = write_sample_case(tmp_path / "data" / "scan", "RUN1", beams=2)
    assert main(["--config", str(config_file), "run", str(case_dir)]) == 0
    out = capsys.readouterr().out
    assert "RTDOSE_beam02.dcm" in out and "RTDOSE_plan.dcm" in out
    assert "Completed: case RUN1: 2/2 beams done" in out


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_server")
def test_a_sample_case_runs_on_a_fresh_data_root(tmp_path, capsys):
    """`mqi sample-case` then `mqi run`, no `mqi demo` first: nothing under the data root yet."""
    config = tmp_path / "fresh.yaml"
    phantom = "tps:\n  phantom:\n    dims: [20, 20, 20]\n    unit_mm: [10, 10, 10]\n"
    config.write_text(f"data_root: {tmp_path / 'fresh'}\n{phantom}")
    cases = tmp_path / "cases"
    assert main(["sample-case", str(cases), "--case-id", "FRESH", "--beams", "1"]) == 0
    assert not (tmp_path / "fresh").exists()
    assert main(["--config", str(config), "run", str(cases / "FRESH")]) == 0
    assert "Completed: case FRESH: 1/1 beams done" in capsys.readouterr().out
