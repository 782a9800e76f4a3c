"""A beam's staged engine input (tasks/moqui/staging.py), and the interpreter's (interpreter/staging.py)."""

from pathlib import Path

import pydicom
import pytest

from config.profiles import shipped_profiles
from standins.sample_case import write_sample_case
from tasks.casefolder import discover_case
from tasks.common.errors import PermanentError
from tasks.interpreter.staging import stage_interpreter_input
from tasks.moqui.staging import stage_beam, staged_files
from tests.case_edits import tree_state

PUBLIC = shipped_profiles()["moqui-smc-public"]
CLINIC = shipped_profiles()["moqui-smc-clinic"]


def layer_csvs(root: Path, case, rows: dict[str, str]) -> Path:
    """An interpreter output folder with the given rows for every layer of every beam."""
    for beam in case.beams:
        folder = root / "log" / beam.csv_dir_name
        folder.mkdir(parents=True)
        for layer in range(1, beam.layers + 1):
            (folder / f"{layer:02d}_150.00MeV.csv").write_bytes(rows[beam.name].encode())
    return root


@pytest.fixture
def case(tmp_path):
    return discover_case(write_sample_case(tmp_path / "scan", "ST1", beams=3, layers=2))


def test_each_beam_reads_its_own_folder_whatever_comes_before_it(case, tmp_path):
    rows = {beam.name: f"0.0,1.5,-2.5,{10 * beam.number}\r\n0.06,1.5,-2.5,7\r\n" for beam in case.beams}
    out = layer_csvs(tmp_path / "Log_csv", case, rows)
    for beam in case.beams:  # numbers 2, 3, 4 behind the SETUP beam 1
        staged = stage_beam(PUBLIC, Path(case.plan_path), out, beam, tmp_path / f"s{beam.number}", "subject")
        assert staged.engine_beam_number == beam.number
        entries = sorted(p.name for p in (staged.folder / "log").iterdir())
        assert len(entries) == beam.number and entries[-1].endswith(beam.csv_dir_name)  # (k-1)-th entry
        assert all((staged.folder / "log" / pad).is_dir() for pad in entries[:-1])
        csv = sorted((staged.folder / "log" / entries[-1]).glob("*.csv"))[0]
        assert (
            csv.read_text() == f"0.0,1.5,-2.5,{10 * beam.number},\n0.06,1.5,-2.5,7,\n"
        )  # the engine's records
        assert staged.records == 2 * beam.layers
        plan = pydicom.dcmread(staged.folder / "plan" / "plan.dcm")
        assert int(plan.IonBeamSequence[beam.number - 1].BeamNumber) == beam.number
        assert str(plan.IonBeamSequence[beam.number - 1].BeamName) == beam.name  # what names the output


def test_a_beam_numbered_beyond_the_count_takes_the_last_place(case, tmp_path):
    plan_path = tmp_path / "numbered.dcm"
    plan = pydicom.dcmread(case.plan_path)
    plan.IonBeamSequence[3].BeamNumber = 7  # beams 1, 2, 3, 7
    for group in plan.FractionGroupSequence:
        for ref in group.ReferencedBeamSequence:
            if int(ref.ReferencedBeamNumber) == 4:
                ref.ReferencedBeamNumber = 7
    plan.save_as(plan_path)
    beam = case.beams[2].model_copy(update={"number": 7})
    out = layer_csvs(tmp_path / "Log_csv", case, {b.name: "0,0,0,1\r\n" for b in case.beams})
    staged = stage_beam(PUBLIC, plan_path, out, beam, tmp_path / "s7", "subject")
    assert staged.engine_beam_number == 4
    copy = pydicom.dcmread(staged.folder / "plan" / "plan.dcm")
    assert [(int(b.BeamNumber), str(b.BeamName)) for b in copy.IonBeamSequence][3] == (4, beam.name)
    assert sorted(int(b.BeamNumber) for b in copy.IonBeamSequence) == [1, 2, 3, 4]
    assert sorted(p.name for p in (staged.folder / "log").iterdir())[-1] == f"3_{beam.csv_dir_name}"


def test_records_that_are_not_counts_are_refused_naming_file_and_line(case, tmp_path):
    out = layer_csvs(tmp_path / "Log_csv", case, {b.name: "0,0,0,1\r\n0.1,2,2,1.5\r\n" for b in case.beams})
    with pytest.raises(PermanentError, match=r"subject: .*01_150.00MeV.csv, line 2: MU '1.5' is not a whole"):
        stage_beam(PUBLIC, Path(case.plan_path), out, case.beams[0], tmp_path / "s", "subject")


def test_the_clinic_profile_keeps_the_interpreters_rows_and_the_angles(case, tmp_path):
    rows = "0.0,1.5,-2.5,10\r\n"
    out = layer_csvs(tmp_path / "Log_csv", case, {b.name: rows for b in case.beams})
    beam = case.beams[1]  # gantry 90
    staged = stage_beam(CLINIC, Path(case.plan_path), out, beam, tmp_path / "s", "subject")
    csv = sorted(staged.folder.glob("log/*/*.csv"))[0]
    assert csv.read_bytes() == rows.encode()
    plan = pydicom.dcmread(staged.folder / "plan" / "plan.dcm")
    assert float(plan.IonBeamSequence[2].IonControlPointSequence[0].GantryAngle) == 90.0


def test_staging_again_replaces_what_was_there(case, tmp_path):
    out = layer_csvs(tmp_path / "Log_csv", case, {b.name: "0,0,0,1\r\n" for b in case.beams})
    folder = tmp_path / "s"
    (folder / "log" / "stale").mkdir(parents=True)
    stage_beam(PUBLIC, Path(case.plan_path), out, case.beams[0], folder, "subject")
    assert not (folder / "log" / "stale").exists()
    assert [p.relative_to(folder).as_posix() for p in staged_files(folder)][
        0
    ] == f"log/1_{case.beams[0].csv_dir_name}/01_150.00MeV.csv"


def test_the_interpreter_gets_one_delivery_per_beam_in_plan_order(tmp_path):
    case_dir = write_sample_case(tmp_path / "scan", "ST2", beams=2, layers=2, fractions=2)
    case = discover_case(case_dir)
    before = tree_state(case_dir)
    staged = stage_interpreter_input(case, tmp_path / "in" / "ST2")
    assert sorted(p.name for p in staged.iterdir() if p.is_dir()) == ["01", "02"]
    for index, beam in enumerate(case.beams, start=1):
        assert f"DICOM_BEAM_NUMBER,{beam.number}" in (staged / f"{index:02d}" / "PlanInfo.txt").read_text()
        assert sorted(p.name for p in (staged / f"{index:02d}").iterdir()) == sorted(
            p.name for p in Path(beam.delivery.path).iterdir()
        )
    plan = pydicom.dcmread(next(staged.glob("*.dcm")))
    assert [int(b.BeamNumber) for b in plan.IonBeamSequence] == [b.number for b in case.beams]  # no SETUP
    assert tree_state(case_dir) == before


@pytest.mark.parametrize("change", ["delivery folder renamed", "log rewritten"])
def test_the_interpreter_is_not_given_a_case_folder_changed_since_discovery(tmp_path, change):
    case_dir = write_sample_case(tmp_path / "scan", "ST3", beams=2, layers=2)
    case = discover_case(case_dir)
    delivery = Path(case.beams[1].delivery.path)
    if change == "delivery folder renamed":
        delivery.rename(delivery.with_name("2025042409990000"))
        expected = "added 2025042409990000/L001.mgn, 2025042409990000/L001.ptn"
    else:
        (delivery / "L002.ptn").write_bytes(bytes(32))
        expected = f"changed {delivery.name}/L002.ptn"
    with pytest.raises(PermanentError) as raised:
        stage_interpreter_input(case, tmp_path / "in" / "ST3")
    assert f"case ST3: the case folder {case_dir} changed since discovery ({expected}" in str(raised.value)
