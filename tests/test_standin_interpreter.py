"""The stand-in interpreter, run as the orchestrator runs it: a subprocess with the real arguments,
reading the machine logs as the clinic's interpreter reads them (and mis-mapping them the same way)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from standins.interpreter import layer_csv_name
from standins.machine_logs import CALIBRATIONS, RANGE_FACTORS, decode
from standins.pencil_beam import COUNTS_PER_MU
from standins.sample_case import range_code, write_sample_case
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


def rows_of(path: Path) -> list[list[str]]:
    with path.open(newline="") as stream:
        return list(csv.reader(stream))


@pytest.mark.parametrize("scan_mode", ["MODULATED", "LINE"])
def test_one_csv_per_layer_from_the_machine_logs(tmp_path: Path, scan_mode: str) -> None:
    case_dir = write_sample_case(
        tmp_path / "scan", "DEMO001", layers=20, spots_per_layer=30, scan_mode=scan_mode
    )
    case = discover_case(case_dir)
    out = tmp_path / "work" / "Log_csv"
    result = run_interpreter(case_dir, out)
    assert result.returncode == 0, result.stderr
    assert "--- MQI Data Processing Completed Successfully ---" in result.stdout
    plan = Path(case.plan_path)
    assert (out / "plan" / plan.name).read_bytes() == plan.read_bytes()
    assert sorted(p.name for p in (out / "log").iterdir()) == ["1G000_TX", "2G090_TX", "3G270_TX"]
    for beam in case.beams:
        files = sorted((out / "log" / beam.csv_dir_name).iterdir())
        assert len(files) == beam.layers == 20
        assert files[-1].name == "20_70.00MeV.csv"  # %.2f, as the real tool names them
        energies = [float(f.name[3:-7]) for f in files]
        assert [f.name for f in files] == [layer_csv_name(i, e) for i, e in enumerate(energies, start=1)]
        total = 0
        for path in files:
            assert path.read_bytes().endswith(b"\r\n")  # the csv module's rows
            rows = rows_of(path)
            assert all(len(row) == 4 for row in rows) and all(row[3].isdigit() for row in rows)
            assert all(abs(float(row[1])) <= 20 and abs(float(row[2])) <= 20 for row in rows)
            total += sum(int(row[3]) for row in rows)
        # the counts the machine logged, back within the rounding of each sample's Dose1
        assert total == pytest.approx(beam.meterset * COUNTS_PER_MU, rel=0.02)


def test_each_record_is_one_row_decoded_with_the_rooms_calibration(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "CAL", beams=1, layers=1, spots_per_layer=4, machine="G1")
    case = discover_case(case_dir)
    out = tmp_path / "out"
    assert run_interpreter(case_dir, out).returncode == 0
    [ptn] = list(Path(case.beams[0].delivery.path).glob("*.ptn"))
    records = decode(ptn.read_bytes())
    [layer] = (out / "log" / "1G000_TX").iterdir()
    rows = rows_of(layer)
    assert len(rows) == len(records)
    g1, factor = CALIBRATIONS["G1"], RANGE_FACTORS[range_code(case.beams[0].layers and 160.0)]
    for row, record in zip(rows, records, strict=True):
        assert float(row[1]) == pytest.approx((record[0] - g1.x_offset) * g1.x_gain_mm, abs=1e-4)
        assert float(row[2]) == pytest.approx((record[1] - g1.y_offset) * g1.y_gain_mm, abs=1e-4)
        assert int(row[3]) == round(record[4] * factor)
    assert [float(row[0]) for row in rows[:3]] == pytest.approx([0.0, g1.time_gain_ms, 2 * g1.time_gain_ms])


def test_logs_are_handed_to_layers_by_sorted_order_alone(tmp_path: Path) -> None:
    """As the real tool: a second delivery of beam 2 sorted before beam 3's becomes beam 3's logs."""
    case_dir = write_sample_case(tmp_path / "scan", "FR2", beams=2, layers=2, fractions=2)
    day1, _, day2_beam2, _ = sorted(p for p in case_dir.iterdir() if p.is_dir())
    assert "DICOM_BEAM_NUMBER,2" in (day2_beam2 / "PlanInfo.txt").read_text()
    between = day2_beam2.rename(case_dir / str(int(day1.name) + 1))  # sorts right after beam 2's first
    out = tmp_path / "out"
    assert run_interpreter(case_dir, out).returncode == 0
    beam3 = [sum(int(row[3]) for row in rows_of(p)) for p in sorted((out / "log" / "2G090_TX").glob("*.csv"))]

    def counts(folder: Path) -> list[int]:
        codes = [int(line.split(",")[5]) for line in (folder / "PlanRange.txt").read_text().splitlines()[1:]]
        return [
            sum(round(d * RANGE_FACTORS[code]) for d in decode(p.read_bytes())[:, 4])
            for p, code in zip(sorted(folder.glob("*.ptn")), codes, strict=True)
        ]

    folders = [p for p in case_dir.iterdir() if p.is_dir()]
    own = next(p for p in folders if "DICOM_BEAM_NUMBER,3" in (p / "PlanInfo.txt").read_text())
    assert beam3 == counts(between) != counts(own)


def test_odd_case_name(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, 'Case "O\'Brien" – Ünïcødé', beams=1, layers=2)
    result = run_interpreter(case_dir, tmp_path / "out dir")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out dir" / "log" / "1G000_TX").glob("*.csv"))) == 2


def test_a_setup_field_without_energies_is_refused_as_the_real_tool_refuses_it(tmp_path: Path) -> None:
    import pydicom

    case_dir = write_sample_case(tmp_path, "OLDSETUP", beams=1, layers=1)
    path = next(case_dir.glob("RP.*.dcm"))
    plan = pydicom.dcmread(path)
    for point in plan.IonBeamSequence[0].IonControlPointSequence:  # as the old sample wrote it
        del point.NominalBeamEnergy, point.CumulativeMetersetWeight
    plan.save_as(path)
    result = run_interpreter(case_dir, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: Invalid data or configuration. Error: Missing NominalBeamEnergy or "
        "CumulativeMetersetWeight in a control point for beam 'SETUP'."
    )


def test_case_without_plan_fails_clearly(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "NOPLAN")
    next(case_dir.glob("RP.*.dcm")).unlink()
    result = run_interpreter(case_dir, tmp_path / "out")
    assert result.returncode == 1
    assert "No .dcm file found" in result.stderr and "NOPLAN" in result.stderr


def test_a_delivery_without_planinfo_fails_naming_it(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "NOINFO", beams=1, layers=1)
    folder = next(p for p in case_dir.iterdir() if p.is_dir())
    (folder / "PlanInfo.txt").unlink()
    result = run_interpreter(case_dir, tmp_path / "out")
    assert result.returncode == 1 and f"PlanInfo.txt not found in {folder.name}" in result.stderr


@pytest.mark.parametrize("args", [["--logdir", "somewhere"], ["--outputdir", "out"]])
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run_interpreter(tmp_path, tmp_path, args=args)
    assert result.returncode == 2 and result.stderr


def test_injected_error_only_for_its_keys(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "CASE1", beams=1, layers=1)
    env = {"MQI_STANDIN_INTERPRETER_FAULT": "error", "MQI_STANDIN_INTERPRETER_FAULT_KEYS": "CASE1"}
    failed = run_interpreter(case_dir, tmp_path / "out", env)
    assert failed.returncode == 1 and "Error: injected error for case CASE1" in failed.stderr
    env["MQI_STANDIN_INTERPRETER_FAULT_KEYS"] = "OTHER"
    assert run_interpreter(case_dir, tmp_path / "out2", env).returncode == 0


def test_injected_segfault(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "CASE1", beams=1, layers=1)
    result = run_interpreter(case_dir, tmp_path / "out", {"MQI_STANDIN_INTERPRETER_FAULT": "segfault"})
    assert result.returncode < 0


def test_fail_first_with_launch_log(tmp_path: Path) -> None:
    case_dir = write_sample_case(tmp_path, "CASE1", beams=1, layers=1)
    log = tmp_path / "launches.jsonl"
    env = {"MQI_STANDIN_INTERPRETER_FAIL_FIRST": "1", "MQI_STANDIN_LAUNCH_LOG": str(log)}
    assert run_interpreter(case_dir, tmp_path / "out", env).returncode == 1
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
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
