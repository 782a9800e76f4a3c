"""Case folder discovery: a good case, and one test per way a real case folder went wrong."""

from __future__ import annotations

import json
import pickle
import shutil
from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from standins.sample_case import main as sample_case_main
from standins.sample_case import write_sample_case
from tasks.casefolder import (
    Case,
    CaseError,
    discover_case,
    inspect_case,
)
from tasks.casefolder.content import check_unchanged
from tasks.common.errors import PermanentError
from tests.case_edits import deliveries, delivery_of, drop_last_layer_row, plan_file, set_planinfo, tree_state

ODD_CASE_ID = 'Case "O\'Brien" – Ünïcødé 01'


def make_case(tmp_path: Path, case_id: str = "DEMO001", **options: object) -> Path:
    return write_sample_case(tmp_path / "scan", case_id, **options)


def problems(case_dir: Path, **options: object) -> list[str]:
    return inspect_case(case_dir, **options).problems


def one_problem(case_dir: Path, **options: object) -> str:
    found = problems(case_dir, **options)
    assert len(found) == 1, found
    return found[0]


def test_good_case(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    inspection = inspect_case(case_dir)
    assert inspection.problems == []
    assert inspection.ready
    case = discover_case(case_dir, ready_marker="_CASE_READY")
    assert case == inspection.case
    assert case.case_id == "DEMO001"
    assert case.patient_id == "DEMO001"
    assert (case.machine, case.room) == ("G2", 2)
    assert Path(case.plan_path) == plan_file(case_dir)
    assert case.plan_sop_instance_uid in Path(case.plan_path).name
    assert [(b.number, b.name, b.gantry_angle, b.layers, b.scan_mode) for b in case.beams] == [
        (2, "1G000:TX", 0.0, 6, "MODULATED"),
        (3, "2G090:TX", 90.0, 6, "MODULATED"),
        (4, "3G270:TX", 270.0, 6, "MODULATED"),
    ]
    assert [b.csv_dir_name for b in case.beams] == ["1G000_TX", "2G090_TX", "3G270_TX"]
    assert all(b.meterset > 0 and b.delivery.beam_number == b.number for b in case.beams)
    assert len({b.delivery.folder for b in case.beams}) == 3
    [setup] = case.excluded
    assert (setup.number, setup.name) == (1, "SETUP")
    assert "SETUP" in setup.reason
    assert Case.model_validate_json(case.model_dump_json()) == case

    summary = inspection.to_json_dict()
    json.dumps(summary)
    assert summary["case_id"] == "DEMO001" and summary["ready"] and summary["problems"] == []
    assert summary["plan"] == case.plan_path
    assert [(b["beam_number"], b["beam_name"], b["layers"]) for b in summary["beams"]] == [
        (2, "1G000:TX", 6),
        (3, "2G090:TX", 6),
        (4, "3G270:TX", 6),
    ]
    assert summary["beams"][0]["delivery"] == case.beams[0].delivery.folder
    assert summary["excluded"] == [{"beam_number": 1, "beam_name": "SETUP", "reason": setup.reason}]


def test_sample_case_is_deterministic(tmp_path: Path) -> None:
    first = make_case(tmp_path / "a")
    second = make_case(tmp_path / "b")
    assert {k: v.content for k, v in tree_state(first).items()} == {
        k: v.content for k, v in tree_state(second).items()
    }


def test_sample_case_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        str(tmp_path),
        "--case-id",
        "CLI1",
        "--beams",
        "2",
        "--layers",
        "3",
        "--no-setup-beam",
        "--no-marker",
    ]
    assert sample_case_main(argv) == 0
    case_dir = Path(capsys.readouterr().out.strip())
    assert case_dir == tmp_path / "CLI1"
    inspection = inspect_case(case_dir)
    assert not inspection.ready and inspection.problems == [] and inspection.excluded == []
    assert [(b.number, b.layers) for b in inspection.beams] == [(1, 3), (2, 3)]
    assert sample_case_main(argv) == 1  # never overwrites an existing case folder


def test_mapping_follows_planinfo_not_folder_order(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    first, second = delivery_of(case_dir, 2), delivery_of(case_dir, 3)
    first_info, second_info = (first / "PlanInfo.txt").read_bytes(), (second / "PlanInfo.txt").read_bytes()
    (first / "PlanInfo.txt").write_bytes(second_info)
    (second / "PlanInfo.txt").write_bytes(first_info)
    case = discover_case(case_dir)
    folders = {beam.number: beam.delivery.folder for beam in case.beams}
    assert folders[2] == second.name and folders[3] == first.name


def test_patient_id_mismatch(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    folder = delivery_of(case_dir, 3)
    set_planinfo(folder, "DICOM_PATIENT_ID", "99999999")
    problem = one_problem(case_dir)
    assert problem.startswith("DEMO001: ")
    for part in (folder.name, "PlanInfo.txt", "DICOM_PATIENT_ID", "'99999999'", "'DEMO001'", "beam 3"):
        assert part in problem
    with pytest.raises(CaseError) as raised:
        discover_case(case_dir)
    assert str(raised.value).startswith("DEMO001")
    assert raised.value.problems == [problem]
    assert isinstance(raised.value, ValueError)


def test_missing_delivery_folder(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    shutil.rmtree(delivery_of(case_dir, 3))
    problem = one_problem(case_dir)
    assert "beam 3 '2G090:TX'" in problem and "no delivery folder" in problem
    assert [beam.number for beam in inspect_case(case_dir).beams] == [2, 4]


@pytest.mark.parametrize(("beam_number", "expected"), [(9, "not a beam of the plan"), (1, "'SETUP'")])
def test_extra_delivery_folder(tmp_path: Path, beam_number: int, expected: str) -> None:
    case_dir = make_case(tmp_path)
    extra = case_dir / "2025042409000000"
    shutil.copytree(delivery_of(case_dir, 2), extra)
    set_planinfo(extra, "DICOM_BEAM_NUMBER", str(beam_number))
    problem = one_problem(case_dir)
    for part in ("2025042409000000", f"DICOM_BEAM_NUMBER {beam_number}", "extra delivery folder", expected):
        assert part in problem


def test_two_rtplans(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    other = make_case(tmp_path / "other", seed=1)
    (case_dir / "old plan").mkdir()
    shutil.copy2(plan_file(other), case_dir / "old plan" / "plan.dcm")
    problem = one_problem(case_dir)
    assert "2 RTPLAN files" in problem
    assert plan_file(case_dir).name in problem and "old plan/plan.dcm" in problem
    assert inspect_case(case_dir).plan_path is None


def test_plan_one_level_below_is_found(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    plan = plan_file(case_dir)
    (case_dir / "plan").mkdir()
    plan.rename(case_dir / "plan" / "anything.bin")  # found by header, not by name
    assert discover_case(case_dir).plan_path == str(case_dir / "plan" / "anything.bin")


def test_no_rtplan(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    plan_file(case_dir).unlink()
    (case_dir / "notes.txt").write_text("not DICOM, ignored\n")
    problem = one_problem(case_dir)
    assert "no RTPLAN found" in problem
    assert inspect_case(case_dir).case is None


def test_photon_plan_is_not_an_ion_plan(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    plan = pydicom.dcmread(plan_file(case_dir))
    plan.SOPClassUID = plan.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    plan.save_as(plan_file(case_dir))
    assert "not an RT Ion Plan" in one_problem(case_dir)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_plan(tmp_path: Path, keep: float) -> None:
    case_dir = make_case(tmp_path)
    plan = plan_file(case_dir)
    plan.write_bytes(plan.read_bytes()[: int(plan.stat().st_size * keep)])
    found = problems(case_dir)
    assert any(plan.name in problem and "truncated" in problem for problem in found), found


def test_corrupt_dicom_next_to_a_good_plan(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    (case_dir / "RS.broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    (case_dir / "RD.text.dcm").write_text("this is not DICOM at all")
    found = problems(case_dir)
    assert len(found) == 2, found
    assert any("RS.broken.dcm" in problem for problem in found)
    assert any("RD.text.dcm" in problem and "not a valid DICOM file" in problem for problem in found)


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (drop_last_layer_row, ["PlanRange.txt has 5 layer rows", "the plan has 6 energy layers"]),
        (lambda folder: set_planinfo(folder, "STOP_LAYER_NUMBER", "7"), ["STOP_LAYER_NUMBER 7 is 7 layers"]),
    ],
)
def test_layer_count_mismatch(tmp_path: Path, break_it, expected: list[str]) -> None:
    case_dir = make_case(tmp_path)
    folder = delivery_of(case_dir, 4)
    break_it(folder)
    problem = one_problem(case_dir)
    for part in [folder.name, "beam 4 '3G270:TX'", *expected]:
        assert part in problem


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("THIS LINE HAS NO COMMA", ["PlanInfo.txt line 8", "not a KEY,VALUE line"]),
        ("DICOM_BEAM_NUMBER,7", ["PlanInfo.txt line 8", "DICOM_BEAM_NUMBER appears twice"]),
    ],
)
def test_unparsable_planinfo(tmp_path: Path, line: str, expected: list[str]) -> None:
    case_dir = make_case(tmp_path)
    folder = delivery_of(case_dir, 2)
    with (folder / "PlanInfo.txt").open("a") as info:
        info.write(line + "\n")
    found = problems(case_dir)
    assert any(all(part in problem for part in [folder.name, *expected]) for problem in found), found
    assert inspect_case(case_dir).case is None


def test_planinfo_field_not_an_integer(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    folder = delivery_of(case_dir, 2)
    set_planinfo(folder, "START_LAYER_NUMBER", "one")
    problem = one_problem(case_dir)  # beam 2 still counts as delivered: no second message
    assert folder.name in problem and "START_LAYER_NUMBER is not an integer: 'one'" in problem


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("missing", "no PlanRange.txt or PlanRange.csv"),
        ("header", "header is not"),
        ("short row", "layer rows [2] do not have 11 fields"),
    ],
)
def test_bad_planrange(tmp_path: Path, change: str, expected: str) -> None:
    case_dir = make_case(tmp_path)
    planrange = delivery_of(case_dir, 3) / "PlanRange.txt"
    lines = planrange.read_text().splitlines()
    if change == "missing":
        planrange.unlink()
    elif change == "header":
        planrange.write_text("\n".join(["LAYER,ENERGY", *lines[1:]]) + "\n")
    else:
        planrange.write_text("\n".join([*lines[:2], "1,2,3", *lines[3:]]) + "\n")
    assert expected in one_problem(case_dir)


def test_planrange_csv_is_accepted(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    folder = delivery_of(case_dir, 3)
    (folder / "PlanRange.txt").rename(folder / "PlanRange.csv")
    assert discover_case(case_dir).beams[1].delivery.folder == folder.name


def test_machine_logs_without_planinfo(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    folder = delivery_of(case_dir, 2)
    (folder / "PlanInfo.txt").unlink()
    found = problems(case_dir)
    assert any(folder.name in problem and "no PlanInfo.txt" in problem for problem in found), found
    assert any("beam 2 '1G000:TX'" in problem and "no delivery folder" in problem for problem in found)


def test_partial_files_are_ignored(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    (case_dir / "incoming.zip.tmp").write_bytes(b"PK\x03\x04")
    (case_dir / "RP.next.dcm.part").write_bytes(b"\0" * 128 + b"DICM")
    half = case_dir / "2025042409000000.extracting"
    half.mkdir()
    (half / "L001.ptn").write_bytes(b"\0" * 16)
    (delivery_of(case_dir, 2) / "L007.ptn.extracting").write_bytes(b"\0" * 16)
    assert problems(case_dir) == []


def test_earliest_complete_delivery_wins(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path, fractions=2)
    by_beam = {
        number: [folder.name for folder in folders] for number, folders in deliveries(case_dir).items()
    }
    assert [len(folders) for folders in by_beam.values()] == [2, 2, 2]
    interrupted = case_dir / by_beam[3][0]  # beam 3's first fraction stopped a layer early
    drop_last_layer_row(interrupted)
    set_planinfo(interrupted, "STOP_LAYER_NUMBER", "5")

    def chosen(policy: str) -> dict[int, str]:
        return {b.number: b.delivery.folder for b in discover_case(case_dir, delivery_policy=policy).beams}

    assert chosen("earliest_complete") == {2: by_beam[2][0], 3: by_beam[3][1], 4: by_beam[4][0]}
    assert chosen("latest_complete") == {number: folders[1] for number, folders in by_beam.items()}
    single = problems(case_dir, delivery_policy="single")
    assert len(single) == 3 and all("policy 'single'" in problem for problem in single)

    drop_last_layer_row(case_dir / by_beam[3][1])  # now no complete delivery for beam 3
    found = problems(case_dir)
    assert len(found) == 3  # fraction 1: rows and span; fraction 2: rows
    assert all("beam 3 '2G090:TX'" in problem for problem in found)


def test_deliveries_are_ordered_by_their_parsed_irradiation_time(tmp_path: Path) -> None:
    """A string sort put '2025-04-26 01:44:08' (ISO form) before '2025042501440800' (the machine's)."""
    case_dir = make_case(tmp_path, fractions=2)
    first, second = deliveries(case_dir)[2]  # the machine's form, fraction 1 on the 24th, 2 on the 25th
    set_planinfo(first, "TCSC_IRRAD_DATETIME", "2025-04-26 01:44:08")  # the earlier folder, irradiated last
    chosen = {b.number: b for b in discover_case(case_dir).beams}
    assert chosen[2].delivery.folder == second.name
    assert chosen[2].delivery.irradiation_time == datetime(2025, 4, 25, 1, 44, 8)
    assert [d.folder for d in chosen[2].passed_over] == [first.name]
    assert chosen[2].passed_over[0].irradiation_time == datetime(2025, 4, 26, 1, 44, 8)
    assert [d.folder for d in chosen[3].passed_over] == [deliveries(case_dir)[3][1].name]
    latest = {b.number: b for b in discover_case(case_dir, delivery_policy="latest_complete").beams}
    assert latest[2].delivery.folder == first.name
    assert [d.folder for d in latest[2].passed_over] == [second.name]


@pytest.mark.parametrize("value", ["25.04.2025 01:44", "2025042401446000", "2025-04-24T01:44:08+02:00", ""])
def test_unparsable_irradiation_time_names_the_file_and_line(tmp_path: Path, value: str) -> None:
    case_dir = make_case(tmp_path)
    folder = delivery_of(case_dir, 3)
    set_planinfo(folder, "TCSC_IRRAD_DATETIME", value)
    line = folder.joinpath("PlanInfo.txt").read_text().splitlines().index(f"TCSC_IRRAD_DATETIME,{value}") + 1
    assert one_problem(case_dir) == (
        f"DEMO001: delivery folder {folder.name!r} PlanInfo.txt line {line}: TCSC_IRRAD_DATETIME "
        f"{value!r} is not a date and time (expected YYYYMMDDhhmmssff, as the machine writes it, "
        "or ISO YYYY-MM-DD hh:mm:ss)"
    )


def test_odd_case_id(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path, ODD_CASE_ID)
    case = discover_case(case_dir)
    assert case.case_id == ODD_CASE_ID and Path(case.case_dir).name == ODD_CASE_ID
    assert case.patient_id.isdigit()  # an id a PatientID can carry, derived from the case id
    shutil.rmtree(delivery_of(case_dir, 2))
    with pytest.raises(CaseError) as raised:
        discover_case(case_dir)
    assert str(raised.value).startswith(ODD_CASE_ID)
    assert json.loads(json.dumps(inspect_case(case_dir).to_json_dict()))["case_id"] == ODD_CASE_ID


def test_inspection_never_modifies_the_case(tmp_path: Path) -> None:
    good = make_case(tmp_path)
    bad = make_case(tmp_path / "bad", "BAD")
    set_planinfo(delivery_of(bad, 2), "DICOM_PATIENT_ID", "X")
    (bad / "RS.broken.dcm").write_bytes(b"\0" * 128 + b"DICM")
    before = {case_dir: tree_state(case_dir) for case_dir in (good, bad)}
    for case_dir in (good, bad):
        inspect_case(case_dir)
        inspect_case(case_dir, delivery_policy="single")
    assert {case_dir: tree_state(case_dir) for case_dir in (good, bad)} == before


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    set_planinfo(delivery_of(case_dir, 2), "DICOM_PATIENT_ID", "X")
    shutil.rmtree(delivery_of(case_dir, 3))
    drop_last_layer_row(delivery_of(case_dir, 4))
    (case_dir / "RS.broken.dcm").write_bytes(b"junk")
    found = problems(case_dir)
    assert len(found) == 4, found
    with pytest.raises(CaseError) as raised:
        discover_case(case_dir)
    assert raised.value.problems == found
    assert all(problem in str(raised.value) for problem in found)
    copy = pickle.loads(pickle.dumps(raised.value))  # results and states get pickled
    assert (copy.case_id, copy.problems, str(copy)) == ("DEMO001", found, str(raised.value))


def test_ready_marker(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path, ready_marker=None)
    inspection = inspect_case(case_dir)
    assert not inspection.ready and inspection.problems == []
    assert discover_case(case_dir).case_id == "DEMO001"  # no marker required unless asked
    with pytest.raises(CaseError, match="_CASE_READY: readiness marker is missing"):
        discover_case(case_dir, ready_marker="_CASE_READY")
    (case_dir / "DONE").touch()
    assert inspect_case(case_dir, ready_marker="DONE").ready


@pytest.mark.parametrize(("machine", "room"), [("G1", 1), ("Gantry 2", 2), ("GTR2", 2), ("PROTON", None)])
def test_room_from_machine_name(tmp_path: Path, machine: str, room: int | None) -> None:
    case = discover_case(make_case(tmp_path, machine=machine))
    assert (case.machine, case.room) == (machine, room)


def test_line_scanning_plan_is_discovered(tmp_path: Path) -> None:
    case = discover_case(make_case(tmp_path, scan_mode="LINE", layers=4))
    assert {(beam.scan_mode, beam.layers) for beam in case.beams} == {("LINE", 4)}


def test_plan_without_treatment_beams(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path, beams=0)
    assert "no treatment beams" in one_problem(case_dir)


def test_missing_case_folder(tmp_path: Path) -> None:
    inspection = inspect_case(tmp_path / "nowhere")
    assert inspection.case is None and not inspection.ready
    assert inspection.problems == [f"nowhere: {tmp_path / 'nowhere'}: is not a folder"]


def test_unknown_delivery_policy_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="delivery_policy"):
        inspect_case(make_case(tmp_path), delivery_policy="newest")  # type: ignore[arg-type]


def test_plan_problems_do_not_hide_delivery_problems(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    plan = pydicom.dcmread(plan_file(case_dir))
    del plan.FrameOfReferenceUID
    del plan.IonBeamSequence[2].IonControlPointSequence[0].GantryAngle  # beam 3
    plan.save_as(plan_file(case_dir))
    set_planinfo(delivery_of(case_dir, 4), "DICOM_PATIENT_ID", "X")
    found = problems(case_dir)
    assert len(found) == 3, found  # beam 3's delivery is neither "extra" nor matched
    assert any("FrameOfReferenceUID is missing" in problem for problem in found)
    assert any("beam 3 '2G090:TX'" in problem and "GantryAngle" in problem for problem in found)
    assert any("DICOM_PATIENT_ID 'X' (beam 4)" in problem for problem in found)
    assert inspect_case(case_dir).plan_path == str(plan_file(case_dir))


def test_check_unchanged_names_what_changed_since_discovery(tmp_path: Path) -> None:
    case_dir = make_case(tmp_path)
    content = discover_case(case_dir).content
    assert content.key and "_CASE_READY" not in {entry.path for entry in content.files}
    (case_dir / "_CASE_READY").touch()  # the marker written again, a transfer in progress: no change
    (case_dir / "RP.next.dcm.part").write_bytes(b"partial")
    check_unchanged(content)
    ptn = delivery_of(case_dir, 3) / "L002.ptn"
    ptn.write_bytes(ptn.read_bytes() + bytes(16))
    (delivery_of(case_dir, 2) / "L001.mgn").unlink()
    (case_dir / "RP.next.dcm.part").rename(case_dir / "RP.next.dcm")
    with pytest.raises(PermanentError) as raised:
        check_unchanged(content)
    removed = f"{delivery_of(case_dir, 2).name}/L001.mgn"
    changes = f"added RP.next.dcm; removed {removed}; changed {ptn.parent.name}/L002.ptn"
    assert str(raised.value).startswith(
        f"case DEMO001: the case folder {case_dir} changed since discovery ({changes})"
    )
    assert raised.value.cause == f"the case folder changed since discovery ({changes})"
    case_dir.rename(case_dir.with_name("DEMO001-renamed"))
    with pytest.raises(PermanentError, match="is gone .renamed, moved or removed. since discovery"):
        check_unchanged(content)


def test_files_changing_while_the_folder_is_read_are_a_problem(tmp_path: Path, monkeypatch) -> None:
    from tasks.casefolder import inspect as inspection

    case_dir = make_case(tmp_path)
    reading = inspection._inspect_folder

    def read_while_copying(*args: object):
        found = reading(*args)
        (case_dir / "late.dcm").write_bytes(b"copied while the folder was read")
        return found

    monkeypatch.setattr(inspection, "_inspect_folder", read_while_copying)
    found = inspect_case(case_dir)
    assert found.problems == ["DEMO001: .: files changed while the case folder was read (added late.dcm)"]
    assert found.arriving == ["its files changed while it was read (added late.dcm)"] and found.case is None
