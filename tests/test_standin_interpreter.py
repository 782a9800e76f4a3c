"""The stand-in interpreter, run as the orchestrator runs it: a subprocess with the real arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from standins.interpreter import layer_csv_name
from standins.sample_case import write_sample_case
from tasks.casefolder import discover_case


def run_interpreter(
    case_dir: Path, out: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MQI_STANDIN_")}
    argv = ["--logdir", str(case_dir), "--outputdir", str(out)] if args is None else args
    return subprocess.run(
        [sys.executable, "-m", "standins.interpreter", *argv],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_writes_one_csv_per_layer(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path / "scan", "DEMO001", layers=20, spots_per_layer=30)
    case = discover_case(case_dir)
    out = tmp_path / "work" / "Log_csv"
    result = run_interpreter(case_dir, out)
    assert result.returncode == 0, result.stderr
    assert "1G000:TX" in result.stdout

    plan = Path(case.plan_path)
    assert (out / "plan" / plan.name).read_bytes() == plan.read_bytes()
    assert sorted(p.name for p in (out / "log").iterdir()) == ["1G000_TX", "2G090_TX", "3G270_TX"]
    for beam in case.beams:
        files = sorted((out / "log" / beam.csv_dir_name).iterdir())
        assert len(files) == beam.layers == 20
        assert files[-1].name == "20_070.00MeV.csv"  # zero-padded energy below 100 MeV
        energies = [float(f.name[3:-7]) for f in files]
        assert [f.name for f in files] == [layer_csv_name(i, e) for i, e in enumerate(energies, start=1)]
        assert energies == sorted(energies, reverse=True)
        total_mu = 0.0
        for csv in files:
            rows = [[float(v) for v in line.split(",")] for line in csv.read_text().splitlines()]
            assert len(rows) == 30 and all(len(row) == 4 for row in rows)
            times = [row[0] for row in rows]
            assert times == sorted(times) and len(set(times)) == 30
            assert all(abs(row[1]) <= 15 and abs(row[2]) <= 15 and row[3] > 0 for row in rows)
            total_mu += sum(row[3] for row in rows)
        assert total_mu == pytest.approx(beam.meterset, rel=1e-5)
    assert (out / "log" / "1G000_TX" / "01_160.00MeV.csv").is_file()


def test_odd_case_name(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, 'Case "O\'Brien" – Ünïcødé', beams=1, layers=2)
    result = run_interpreter(case_dir, tmp_path / "out dir")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out dir" / "log" / "1G000_TX").glob("*.csv"))) == 2


def test_line_scanning_is_refused(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "LINE1", scan_mode="LINE")
    result = run_interpreter(case_dir, tmp_path / "out")
    assert result.returncode == 1
    assert "line scanning" in result.stderr and "real mqi_interpreter" in result.stderr
    assert "beam 2 '1G000:TX'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_case_without_plan_fails_clearly(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "NOPLAN")
    next(case_dir.glob("RP.*.dcm")).unlink()
    result = run_interpreter(case_dir, tmp_path / "out")
    assert result.returncode == 1
    assert "expected exactly one RTPLAN" in result.stderr and "NOPLAN" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["--logdir", "somewhere"], ["--outputdir", "out"], ["--logdir", "/nonexistent", "--outputdir", "out"]],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run_interpreter(tmp_path, tmp_path, args=args)
    assert result.returncode == 2 and result.stderr


def test_injected_error_only_for_its_keys(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "CASE1", beams=1, layers=1)
    env = {"MQI_STANDIN_INTERPRETER_FAULT": "error", "MQI_STANDIN_INTERPRETER_FAULT_KEYS": "CASE1"}
    failed = run_interpreter(case_dir, tmp_path / "out", env)
    assert failed.returncode == 1 and "ERROR:" in failed.stdout and "CASE1" in failed.stdout
    env["MQI_STANDIN_INTERPRETER_FAULT_KEYS"] = "OTHER"
    assert run_interpreter(case_dir, tmp_path / "out", env).returncode == 0


def test_injected_segfault(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "CASE1", beams=1, layers=1)
    result = run_interpreter(case_dir, tmp_path / "out", {"MQI_STANDIN_INTERPRETER_FAULT": "segfault"})
    assert result.returncode < 0


def test_fail_first_with_launch_log(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "CASE1", beams=1, layers=1)
    log = tmp_path / "launches.jsonl"
    env = {"MQI_STANDIN_INTERPRETER_FAIL_FIRST": "1", "MQI_STANDIN_LAUNCH_LOG": str(log)}
    assert run_interpreter(case_dir, tmp_path / "out", env).returncode == 1
    assert run_interpreter(case_dir, tmp_path / "out", env).returncode == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["event"], r["tool"], r["key"]) for r in records] == [
        ("start", "interpreter", "CASE1"),
        ("end", "interpreter", "CASE1"),
    ] * 2
    assert [r["attempt"] for r in records if r["event"] == "start"] == [1, 2]
    assert [r["exit"] for r in records if r["event"] == "end"] == [1, 0]


def test_duration_is_a_floor(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "CASE1", beams=1, layers=1)
    log = tmp_path / "launches.jsonl"
    env = {"MQI_STANDIN_INTERPRETER_DURATION": "1.5", "MQI_STANDIN_LAUNCH_LOG": str(log)}
    assert run_interpreter(case_dir, tmp_path / "out", env).returncode == 0
    start, end = (json.loads(line)["time"] for line in log.read_text().splitlines())
    assert end - start >= 1.5
