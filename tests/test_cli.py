"""The `mqi` command line: inspect, config check, sample-case, run."""

from __future__ import annotations

import json
import shutil

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from config import load_settings
from deployments.cli import main
from deployments.queries import rerun
from deployments.server import ServiceError, api_url
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


def test_inspect_names_the_delivery_policy_and_the_deliveries_it_passed_over(tmp_path, capsys):
    case_dir = write_sample_case(tmp_path, "F2", beams=2, fractions=2)
    first, second = sorted(folder.name for folder in case_dir.iterdir() if folder.is_dir())[::2]
    assert main(["inspect", str(case_dir)]) == 0
    out = capsys.readouterr().out
    assert "delivery policy: earliest_complete" in out
    assert (
        f"not recalculated: beam 2 (1G000:TX) delivery {second} (irradiated 2025-04-25 01:44:08): "
        f"earliest_complete chose {first}"
    ) in out
    assert out.count("not recalculated:") == 2
    assert main(["inspect", str(case_dir), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["delivery_policy"] == "earliest_complete"
    assert [b["passed_over"] for b in found["beams"]][0] == [
        {"delivery": second, "irradiation_time": "2025-04-25T01:44:08"}
    ]


def test_inspect_says_when_a_folder_looks_half_copied(tmp_path, capsys):
    case_dir = write_sample_case(tmp_path, "HALF", beams=2)
    shutil.rmtree(sorted(folder for folder in case_dir.iterdir() if folder.is_dir())[-1])
    next(case_dir.glob("RP.*.dcm")).unlink()
    assert main(["inspect", str(case_dir)]) == 1
    out = capsys.readouterr().out
    assert "looks half copied: it has no RTPLAN yet (the file sensor waits and runs it once complete)" in out
    assert main(["inspect", str(case_dir), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["arriving"] == ["it has no RTPLAN yet"]


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
    assert "Completed: RUN1: 2/2 beams done" in out


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
    assert "Completed: FRESH: 1/1 beams done" in capsys.readouterr().out


def test_names_and_messages_are_printed_as_they_are(tmp_path, capsys):
    case_dir = write_sample_case(tmp_path, "P1 [copy]", beams=1)
    assert main(["inspect", str(case_dir)]) == 0
    assert f"case P1 [copy]  ({case_dir})" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("backend:\n  host: 'Bad Host'\n")
    assert main(["--config", str(bad), "config", "check"]) == 2
    assert "[a-z0-9][a-z0-9-]{0,40}" in capsys.readouterr().err  # the pattern, brackets and all


def test_inspect_on_a_scan_folder_says_it_holds_cases(tmp_path, capsys):
    for case_id in ("P1", "P2", "P3"):
        write_sample_case(tmp_path / "scan", case_id, beams=1)
    assert main(["inspect", str(tmp_path / "scan")]) == 1
    err = capsys.readouterr().err
    assert "this is a scan folder holding the cases P1, P2, P3, not a case folder: give one" in err
    assert "RTPLAN files" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["config", "check"],
        ["inspect"],
        ["run"],
        ["demo"],
        ["server"],
        ["up"],
        ["status"],
        ["rerun"],
        ["gpus"],
        ["sample-case"],
    ],
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mqi {' '.join(command)}")


def test_port_and_api_win_over_prefect_api_url_with_a_note(capsys):
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert api_url() == "http://127.0.0.1:4200/api"
        assert capsys.readouterr().err == ""
        assert api_url(4399) == "http://127.0.0.1:4399/api"
        assert "note: using http://127.0.0.1:4399/api, not PREFECT_API_URL=http://127.0.0.1:4200/api" in (
            capsys.readouterr().err
        )
        assert api_url(4399, "http://gpu-server:4200/api/") == "http://gpu-server:4200/api"


def test_rerun_of_a_beam_the_case_does_not_have_is_refused_before_any_run(config_file):
    settings = load_settings(config_file, env={})
    write_sample_case(settings.scan_dir, "P1", beams=2)
    with pytest.raises(ServiceError, match=r"case P1 has no treatment beam 99 \(treatment beams: 2, 3\)"):
        rerun(settings, "P1", [99], False)  # no server: it must not get as far as asking one
