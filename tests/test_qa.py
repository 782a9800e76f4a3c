"""Patient-specific QA: gamma against a TPS dose or an OCTAVIUS measurement, on small grids (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from config import load_settings
from standins.sample_case import write_sample_case
from tasks.casefolder import discover_case
from tasks.dose.model import DoseFrame
from tasks.dose.write import raw_to_rtdose
from tasks.moqui.grid import PhantomGrid
from tasks.qa.check import case_references, check_beam
from tasks.qa.gamma import Criteria, figures, gamma_map
from tasks.qa.grids import aligned, read_mcc, read_rtdose_grid
from tasks.qa.model import BeamQa, QaInputError, Reference, case_verdict
from tests.conftest import write_config

CRITERIA = Criteria(dose_percent=2.0, distance_mm=2.0, cutoff_percent=5.0)
FRAME = DoseFrame("1.2.826.0.1.3680043.8.498.1", "test phantom", "test")


def field(x, y, z=None, *, shift_mm=0.0, scale=1.0):
    """A smooth 6 cm square field with 8 mm penumbrae (Gy), optionally shifted along x and scaled."""

    def edge(u):
        return 0.5 * (np.tanh((30.0 - np.abs(u)) / 4.0) + 1.0)

    lateral = edge(x - shift_mm)[None, :] * edge(y)[:, None]
    if z is None:
        return scale * 2.0 * lateral
    depth = 1.0 + 0.004 * (np.asarray(z) + 60.0)  # a gentle depth dose
    return scale * 2.0 * depth[:, None, None] * lateral[None]


def centres(grid: PhantomGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(
        p + (np.arange(n) + 0.5) * s for p, n, s in zip(grid.position, grid.dims, grid.spacing, strict=True)
    )


@pytest.fixture
def plan_path(tmp_path: Path) -> Path:
    case = write_sample_case(tmp_path / "scan", "QAPLAN", beams=1)
    return next(case.glob("RP.*.dcm"))


def write_dose(path: Path, plan: Path, grid: PhantomGrid, dose: np.ndarray, **tags: object) -> Path:
    raw = path.with_suffix(".raw")
    np.ascontiguousarray(dose, dtype="<f8").tofile(raw)
    raw_to_rtdose([raw], grid, plan, path, summation="BEAM", frame=FRAME, beam_number=2)
    raw.unlink()
    if tags:
        ds = pydicom.dcmread(path)
        for name, value in tags.items():
            setattr(ds, name, value)
        ds.save_as(path)
    return path


def gamma_of(reference: Path, evaluated: Path, criteria: Criteria = CRITERIA):
    ref = read_rtdose_grid(str(reference), rbe=1.1)
    ev = read_rtdose_grid(str(evaluated), rbe=1.1)
    comparison = aligned(ref, ev, criteria.cutoff_gy(float(np.nanmax(ref.dose))))
    gamma = gamma_map(comparison, criteria)
    return comparison, gamma, figures(gamma)


PLANE = PhantomGrid((60, 60, 1), (2.0, 2.0, 2.0), (-60.0, -60.0, -21.0))


def plane_dose(grid: PhantomGrid, **kw) -> np.ndarray:
    x, y, _ = centres(grid)
    return field(x, y, **kw)[None]


def test_identical_doses_pass_everywhere(tmp_path, plan_path):
    ref = write_dose(tmp_path / "ref.dcm", plan_path, PLANE, plane_dose(PLANE))
    ev = write_dose(tmp_path / "ev.dcm", plan_path, PLANE, plane_dose(PLANE))
    _, gamma, found = gamma_of(ref, ev)
    assert found.pass_rate == 100.0
    assert found.max < 0.05  # only the 16-bit quantisation differs
    assert found.points == np.count_nonzero(plane_dose(PLANE) >= 0.05 * plane_dose(PLANE).max())


def test_a_three_percent_scale_fails_2_2_in_the_high_dose_region_only(tmp_path, plan_path):
    ref = write_dose(tmp_path / "ref.dcm", plan_path, PLANE, plane_dose(PLANE))
    ev = write_dose(tmp_path / "ev.dcm", plan_path, PLANE, plane_dose(PLANE, scale=1.03))
    comparison, gamma, found = gamma_of(ref, ev)
    reference = comparison.reference.dose[0]
    top = reference.max()
    assert np.all(gamma[reference >= 0.995 * top] > 1.0)  # 3 % on the flat plateau: no point near agrees
    assert np.all(gamma[(reference >= 0.05 * top) & (reference < 0.6 * top)] <= 1.0)  # < 2 % of max there
    assert found.pass_rate < 95.0
    _, _, loose = gamma_of(ref, ev, Criteria(3.5, 2.0, 5.0))
    assert loose.pass_rate == 100.0


def test_a_one_mm_shift_passes_2_2_and_a_four_mm_shift_does_not(tmp_path, plan_path):
    ref = write_dose(tmp_path / "ref.dcm", plan_path, PLANE, plane_dose(PLANE))
    one = write_dose(tmp_path / "one.dcm", plan_path, PLANE, plane_dose(PLANE, shift_mm=1.0))
    four = write_dose(tmp_path / "four.dcm", plan_path, PLANE, plane_dose(PLANE, shift_mm=4.0))
    assert gamma_of(ref, one)[2].pass_rate == 100.0
    assert gamma_of(ref, four)[2].pass_rate < 95.0


def test_a_reference_on_another_grid_is_compared_by_its_coordinates(tmp_path, plan_path):
    """Spacing 3 mm instead of 2, origin moved by 7.3 mm: aligned by index it would fail."""
    coarse = PhantomGrid((36, 30, 1), (3.0, 3.5, 2.0), (-52.7, -50.0, -21.0))
    ref = write_dose(tmp_path / "ref.dcm", plan_path, coarse, plane_dose(coarse))
    ev = write_dose(tmp_path / "ev.dcm", plan_path, PLANE, plane_dose(PLANE))
    comparison, _, found = gamma_of(ref, ev)
    assert found.pass_rate == 100.0
    assert comparison.reference.x[0] == pytest.approx(-51.2)
    padded = np.pad(plane_dose(coarse), ((0, 0), (0, 30), (0, 24)))  # the coarse array, placed by index
    by_index = write_dose(tmp_path / "index.dcm", plan_path, PLANE, padded)
    assert gamma_of(by_index, ev)[2].pass_rate < 50.0


def test_a_3d_reference_on_another_grid_and_a_3d_comparison(tmp_path, plan_path):
    grid = PhantomGrid((30, 30, 12), (4.0, 4.0, 4.0), (-60.0, -60.0, -48.0))
    tps = PhantomGrid((20, 20, 8), (5.0, 5.0, 5.0), (-48.0, -48.0, -44.0))
    ref = write_dose(tmp_path / "ref.dcm", plan_path, tps, field(*centres(tps)[:2], centres(tps)[2]))
    ev = write_dose(tmp_path / "ev.dcm", plan_path, grid, field(*centres(grid)[:2], centres(grid)[2]))
    comparison, _, found = gamma_of(ref, ev)
    assert comparison.dimensions == 3
    assert found.pass_rate == 100.0 and found.points > 1000


def test_a_plane_reference_is_compared_with_the_3d_dose_at_its_depth(tmp_path, plan_path):
    grid = PhantomGrid((30, 30, 12), (4.0, 4.0, 4.0), (-60.0, -60.0, -48.0))
    x, y, z = centres(grid)
    ev = write_dose(tmp_path / "ev.dcm", plan_path, grid, field(x, y, z))
    plane = PhantomGrid((60, 60, 1), (2.0, 2.0, 2.0), (-60.0, -60.0, -21.0))  # centre z = -20
    px, py, pz = centres(plane)
    ref = write_dose(tmp_path / "ref.dcm", plan_path, plane, field(px, py, pz))
    comparison, _, found = gamma_of(ref, ev)
    assert comparison.dimensions == 2 and float(comparison.evaluated.z[0]) == -20.0
    assert found.pass_rate == 100.0


def test_units_frame_and_size_mismatches_are_errors_naming_both_files(tmp_path, plan_path):
    ev = write_dose(tmp_path / "ev.dcm", plan_path, PLANE, plane_dose(PLANE))
    relative = write_dose(tmp_path / "rel.dcm", plan_path, PLANE, plane_dose(PLANE), DoseUnits="RELATIVE")
    with pytest.raises(QaInputError, match="DoseUnits RELATIVE"):
        gamma_of(relative, ev)
    patient = pydicom.dcmread(plan_path).FrameOfReferenceUID
    in_patient = write_dose(
        tmp_path / "pat.dcm", plan_path, PLANE, plane_dose(PLANE), FrameOfReferenceUID=patient
    )
    with pytest.raises(QaInputError, match="patient's frame of reference"):
        read_rtdose_grid(str(in_patient), rbe=1.1, patient_frame_uid=patient)
    deeper = PhantomGrid((60, 60, 1), (2.0, 2.0, 2.0), (-60.0, -60.0, -41.0))
    other_plane = write_dose(tmp_path / "deep.dcm", plan_path, deeper, plane_dose(deeper))
    with pytest.raises(QaInputError, match=r"not the same plane.*frame mismatch"):
        gamma_of(other_plane, ev)
    wide = PhantomGrid((100, 100, 1), (2.0, 2.0, 2.0), (-100.0, -100.0, -21.0))
    x, y, _ = centres(wide)
    bigger = write_dose(tmp_path / "big.dcm", plan_path, wide, field(x * 0.5, y)[None])  # 12 cm wide
    with pytest.raises(QaInputError, match=r"ref|big.dcm.*beyond .*ev.dcm.*size mismatch"):
        gamma_of(bigger, ev)


def test_check_beam_names_both_files_and_writes_the_verdict_into_the_provenance(tmp_path):
    config = write_config(tmp_path)
    settings = load_settings(config, env={})
    case_dir = write_sample_case(settings.scan_dir, "QA-CHECK", beams=1)
    case = discover_case(case_dir)
    plan = Path(case.plan_path)
    out = tmp_path / "out"
    out.mkdir()
    ev = write_dose(out / "RTDOSE_beam02.dcm", plan, PLANE, plane_dose(PLANE))
    provenance = out / "RTDOSE_beam02.provenance.json"
    provenance.write_text(json.dumps({"rtdose": ev.name}))
    ref = write_dose(case_dir / "RD.1G000.dcm", plan, PLANE, plane_dose(PLANE, scale=1.0))
    refs = case_references(settings, case_dir, case.plan_sop_instance_uid, {2: "1G000:TX"})
    assert refs == {2: [Reference(beam_number=2, kind="TPS RTDOSE", path=str(ref))]}
    qa = check_beam(settings, case, 2, "1G000:TX", ev, provenance, refs[2])
    assert qa.verdict == "pass" and qa.pass_rate == 100.0 and qa.criteria.startswith("2 %/2 mm global")
    assert json.loads(provenance.read_text())["qa"]["pass_rate"] == 100.0
    assert Path(qa.picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = write_dose(tmp_path / "bad.dcm", plan, PLANE, plane_dose(PLANE), DoseUnits="RELATIVE")
    unusable = [Reference(beam_number=2, kind="TPS RTDOSE", path=str(bad))]
    with pytest.raises(QaInputError) as error:
        check_beam(settings, case, 2, "1G000:TX", ev, provenance, unusable)
    message = str(error.value)
    assert str(ev) in message and str(bad) in message
    assert message.startswith("case QA-CHECK: beam 2 (1G000:TX): QA of ")
    with pytest.raises(QaInputError, match="2 QA references, expected one"):
        check_beam(settings, case, 2, "1G000:TX", ev, provenance, refs[2] * 2)
    assert check_beam(settings, case, 2, "1G000:TX", ev, provenance, []).verdict == "no reference"


def write_mcc(path: Path, rows: list[tuple[float, list[tuple[float, float]]]], unit: str = "GY") -> Path:
    lines = ["BEGIN_SCAN_DATA", "\tFORMAT=CC-Export V1.9"]
    for index, (inplane, points) in enumerate(rows, start=1):
        lines += [
            f"\tBEGIN_SCAN  {index}",
            "\t\tSCAN_DEVICE=OCTAVIUS_1500_XDR",
            f"\t\tSCAN_OFFAXIS_INPLANE={inplane:.2f}",
            f"\t\tMEAS_UNIT={unit}",
            "\t\tBEGIN_DATA",
            *(f"\t\t\t{x:.2f}\t\t{dose:.4E}\t\t#{k}" for k, (x, dose) in enumerate(points)),
            "\t\tEND_DATA",
            f"\tEND_SCAN  {index}",
        ]
    path.write_text("\n".join([*lines, "END_SCAN_DATA", ""]), encoding="latin-1")
    return path


def octavius_1500(shift_mm: float = 0.0, scale: float = 1.0) -> list:
    """Rows every 5 mm, detectors every 10 mm, alternate rows offset by 5 mm (the 1500's checkerboard)."""
    rows = []
    for j, inplane in enumerate(np.arange(-50.0, 50.1, 5.0)):
        xs = np.arange(-50.0, 50.1, 10.0) + (5.0 if j % 2 else 0.0)
        xs = xs[xs <= 50.0]
        dose = field(xs, np.array([inplane]), shift_mm=shift_mm, scale=scale)[0]
        rows.append((float(inplane), list(zip(xs.tolist(), dose.tolist(), strict=True))))
    return rows


def test_an_octavius_measurement_is_a_plane_of_detectors(tmp_path, plan_path):
    mcc = read_mcc(str(write_mcc(tmp_path / "1G_020mm.mcc", octavius_1500())), z_mm=-20.0)
    assert mcc.x[0] == -50.0 and mcc.x.size == mcc.y.size == 21  # 5 mm apart, the rows interleaved
    assert np.isnan(mcc.dose).sum() == 21 * 21 - (11 * 11 + 10 * 10)  # NaN where no detector is
    ev = write_dose(tmp_path / "ev.dcm", plan_path, PLANE, plane_dose(PLANE))
    evaluated = read_rtdose_grid(str(ev), rbe=1.1)
    comparison = aligned(mcc, evaluated, CRITERIA.cutoff_gy(float(np.nanmax(mcc.dose))))
    found = figures(gamma_map(comparison, CRITERIA))
    assert found.pass_rate == 100.0
    assert found.points == np.count_nonzero(np.nan_to_num(mcc.dose) >= 0.05 * np.nanmax(mcc.dose))
    hot = read_mcc(str(write_mcc(tmp_path / "hot.mcc", octavius_1500(scale=0.9))), z_mm=-20.0)
    assert figures(gamma_map(aligned(hot, evaluated, 0.1), CRITERIA)).pass_rate < 95.0
    in_cgy = read_mcc(str(write_mcc(tmp_path / "c.mcc", octavius_1500(scale=100.0), unit="CGY")), z_mm=-20.0)
    assert np.nanmax(in_cgy.dose) == pytest.approx(np.nanmax(mcc.dose), rel=1e-3)
    with pytest.raises(QaInputError, match=r"bad.mcc:6: MEAS_UNIT PERCENT"):
        read_mcc(str(write_mcc(tmp_path / "bad.mcc", octavius_1500(), unit="PERCENT")), z_mm=-20.0)


def test_references_are_found_by_plan_uid_beam_number_and_measurement_name(tmp_path):
    settings = load_settings(write_config(tmp_path), env={})
    case_dir = write_sample_case(settings.scan_dir, "QA-FIND", beams=2)
    case = discover_case(case_dir)
    plan = Path(case.plan_path)
    mine = write_dose(case_dir / "RD.1G000.dcm", plan, PLANE, plane_dose(PLANE))  # beam_number 2
    other_plan = write_sample_case(tmp_path / "other", "OTHER", beams=1)
    write_dose(case_dir / "RD.other.dcm", next(other_plan.glob("RP.*.dcm")), PLANE, plane_dose(PLANE))
    (case_dir / "QA").mkdir()
    measured = write_mcc(case_dir / "QA" / "2G_020mm.mcc", octavius_1500())
    write_mcc(case_dir / "QA" / "9G_020mm.mcc", octavius_1500())  # no field 9
    refs = case_references(settings, case_dir, case.plan_sop_instance_uid, {2: "1G000:TX", 3: "2G090:TX"})
    assert refs == {
        2: [Reference(beam_number=2, kind="TPS RTDOSE", path=str(mine))],
        3: [Reference(beam_number=3, kind="measurement (.mcc)", path=str(measured))],
    }
    again = discover_case(case_dir)  # the references change nothing in discovery but the file list
    assert again.model_copy(update={"content": case.content}) == case


def test_the_case_verdict_line():
    def qa(number, verdict, rate=None):
        return BeamQa(beam_number=number, verdict=verdict, pass_rate=rate)

    assert case_verdict([qa(2, "pass", 98.84), qa(3, "pass", 100.0), qa(4, "pass", 99.96)]) == (
        "QA: 3/3 pass (98.8 %, 100 %, 99.9 %)"
    )
    assert case_verdict([qa(2, "pass", 99.0), qa(3, "fail", 91.24), qa(4, "no reference")]) == (
        "QA: 1/3 pass (99 %, 91.2 %); FAIL: beam 3; no reference: beam 4"
    )
    assert case_verdict([qa(2, "error"), qa(3, "pass", 100.0)]) == "QA: 1/2 pass (100 %); QA error: beam 2"
    assert case_verdict([qa(2, "no reference"), qa(3, "no reference")]) == ""


def test_mqi_inspect_lists_each_beams_qa_references(tmp_path, capsys):
    from deployments.cli import main

    config = write_config(tmp_path)
    settings = load_settings(config, env={})
    case_dir = write_sample_case(settings.scan_dir, "QA-INSPECT", beams=2)
    case = discover_case(case_dir)
    write_dose(case_dir / "RD.1G000.dcm", Path(case.plan_path), PLANE, plane_dose(PLANE))
    assert main(["--config", str(config), "inspect", str(case_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["qa_references"]
    assert shown == {
        "2": [{"beam_number": 2, "kind": "TPS RTDOSE", "path": str(case_dir / "RD.1G000.dcm")}],
        "3": [],
    }
    assert main(["--config", str(config), "inspect", str(case_dir)]) == 0
    out = capsys.readouterr().out
    assert "RD.1G000.dcm" in out and "no reference" in out


def test_near_misses_are_searched_again_so_the_step_does_not_decide(tmp_path, plan_path):
    """A 2 mm shift at 2 mm: the penumbra's gammas lie just below 1, and a search in 0.2 mm steps finds
    some just above (8 points of pass rate here); searched again, the verdict is a 30-step search's."""
    coarse = PhantomGrid((40, 40, 1), (2.0, 2.0, 2.0), (-40.0, -40.0, -21.0))
    fine = PhantomGrid((80, 80, 1), (1.0, 1.0, 2.0), (-40.0, -40.0, -21.0))
    reference = write_dose(tmp_path / "r.dcm", plan_path, coarse, plane_dose(coarse))
    ref = read_rtdose_grid(str(reference), rbe=1.1)
    shifted = plane_dose(fine, shift_mm=2.0)
    ev = read_rtdose_grid(str(write_dose(tmp_path / "e.dcm", plan_path, fine, shifted)), rbe=1.1)
    comparison = aligned(ref, ev, 0.1)
    default = figures(gamma_map(comparison, CRITERIA)).pass_rate
    finest = figures(gamma_map(comparison, Criteria(2.0, 2.0, 5.0, search_steps=30))).pass_rate  # no refining
    assert abs(default - finest) < 0.5, (default, finest)
