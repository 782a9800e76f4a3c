"""RTDOSE writing, collection, plan sums and validation (tasks/dose), on small grids."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from standins.sample_case import write_sample_case
from tasks.dose import chunks as dose_chunks
from tasks.dose.model import RT_DOSE_SOP_CLASS, DoseFrame, RtDoseError, RtDoseInfo
from tasks.dose.plansum import sum_rtdose
from tasks.dose.read import collect_engine_rtdose, read_dose_gy
from tasks.dose.validate import dciodvfy_available, validate_rtdose
from tasks.dose.write import raw_to_rtdose
from tasks.moqui.grid import PhantomGrid

RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"
DCIODVFY = "/usr/bin/dciodvfy"
# Anisotropic spacing and an off-origin corner, so swapped axes or a corner/centre mix-up show.
GRID = PhantomGrid(dims=(12, 10, 8), spacing=(2.0, 2.5, 3.0), position=(-12.0, -12.5, -30.0))
NX, NY, NZ = GRID.dims
FRAME = DoseFrame(
    uid=generate_uid(), comment="beam-aligned water phantom, beam along -z", label="water phantom"
)


def to_rtdose(*args, frame: DoseFrame = FRAME, **kw) -> RtDoseInfo:
    """raw_to_rtdose in the test phantom's frame unless another is given."""
    return raw_to_rtdose(*args, frame=frame, **kw)


@pytest.fixture(params=["one chunk", "3-frame chunks"])
def chunking(request, monkeypatch):
    """Run each conversion test with whole-grid chunks and with several chunks and a short last one."""
    if request.param == "3-frame chunks":
        monkeypatch.setattr(dose_chunks, "_CHUNK_BYTES", 3 * NX * NY * 8)
    return request.param


def write_plan(path: Path) -> Path:
    """A minimal RT Ion Plan: patient, study, frame of reference, SOP instance (UTF-8 name)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_ION_PLAN
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RT_ION_PLAN
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTPLAN"
    ds.PatientName = "Müller^Anna"
    ds.PatientID = "12345678"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20250424", "101500"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.fixture
def plan(tmp_path) -> Path:
    return write_plan(tmp_path / "RP.test.dcm")


def blob(seed: int, peak: float = 2.0) -> np.ndarray:
    """A dose-like array, shape (nz, ny, nx): a Gaussian blob on zeros plus a little noise."""
    z, y, x = np.indices(GRID.shape, dtype=float)
    rng = np.random.default_rng(seed)
    dose = peak * np.exp(-((x - 6) ** 2 / 8 + (y - 4) ** 2 / 6 + (z - 3 - seed % 3) ** 2 / 4))
    dose += rng.random(GRID.shape) * 0.01
    dose[dose < 0.02] = 0.0
    return dose


def write_raw(path: Path, dose: np.ndarray) -> Path:
    dose.astype(np.float64).tofile(path)
    return path


def beam(tmp_path, plan, seed=1, number=2, **kw) -> tuple[RtDoseInfo, np.ndarray]:
    dose = blob(seed)
    raw = write_raw(tmp_path / f"beam{number}.raw", dose)
    out = tmp_path / "out" / f"RTDOSE_beam{number}.dcm"
    info = to_rtdose([raw], GRID, plan, out, summation="BEAM", beam_number=number, **kw)
    return info, dose


def dciodvfy_report(path: Path) -> list[str]:
    """The real verifier's Error and Warning lines (it must be installed: CI installs it)."""
    if not Path(DCIODVFY).exists():
        pytest.fail(f"{DCIODVFY} is missing: apt-get install dicom3tools")
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


def test_beam_round_trips_within_scaling_precision(tmp_path, plan, chunking):
    info, dose = beam(tmp_path, plan)
    back = read_dose_gy(info.path)
    assert back.shape == (NZ, NY, NX)
    assert info.scaling == pytest.approx(dose.max() / 65535, rel=1e-9)
    assert np.abs(back - dose).max() <= info.scaling / 2 + 1e-12
    assert info.max_dose_gy == dose.max()
    assert info.summation == "BEAM" and info.beam_number == 2
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert not list(info.path.parent.glob("*.part"))


def test_voxel_layout_follows_the_grid_contract(tmp_path, plan):
    """Voxel (i, j, k) sits at flat index i + nx*(j + ny*k) and lands at frame k, row j, column i."""
    flat = np.zeros(GRID.voxel_count)
    i, j, k = 7, 3, 5
    flat[i + NX * (j + NY * k)] = 1.0
    raw = write_raw(tmp_path / "one.raw", flat)
    info = to_rtdose([raw], GRID, plan, tmp_path / "one.dcm", summation="BEAM", beam_number=1)
    back = read_dose_gy(info.path)
    assert back[k, j, i] == pytest.approx(1.0, abs=info.scaling / 2)
    assert np.count_nonzero(back) == 1


def test_geometry_and_rt_dose_attributes(tmp_path, plan):
    info, _ = beam(tmp_path, plan, dose_type="EFFECTIVE", fraction_group=3)
    ds = pydicom.dcmread(info.path)
    assert ds.SOPClassUID == RT_DOSE_SOP_CLASS and ds.Modality == "RTDOSE"
    assert (ds.Rows, ds.Columns, ds.NumberOfFrames) == (NY, NX, NZ)
    assert [float(v) for v in ds.ImagePositionPatient] == [-11.0, -11.25, -28.5]
    assert [float(v) for v in ds.ImagePositionPatient] == list(GRID.first_voxel_centre)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == [2.5, 2.0]  # row spacing (dy) first
    assert [float(v) for v in ds.GridFrameOffsetVector] == [3.0 * k for k in range(NZ)]
    assert float(ds.SliceThickness) == 3.0
    assert ds.FrameIncrementPointer == 0x3004000C
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 0)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "EFFECTIVE", "BEAM")
    assert float(ds.DoseGridScaling) == info.scaling > 0
    assert len(ds.PixelData) == NX * NY * NZ * 2
    group = ds.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence[0]
    assert group.ReferencedFractionGroupNumber == 3
    assert group.ReferencedBeamSequence[0].ReferencedBeamNumber == 2


def test_patient_and_study_come_from_the_plan_the_frame_of_reference_is_the_phantoms(tmp_path, plan):
    info, _ = beam(tmp_path, plan)
    ds, rp = pydicom.dcmread(info.path), pydicom.dcmread(plan)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        assert ds[keyword].value == rp[keyword].value, keyword
    # The dose is in the engine's water phantom, not in the patient: never the plan's frame.
    assert ds.FrameOfReferenceUID == FRAME.uid != rp.FrameOfReferenceUID
    assert ds.DoseComment == FRAME.comment and ds.SeriesDescription.endswith(", water phantom")
    assert str(ds.PatientName) == "Müller^Anna"
    reference = ds.ReferencedRTPlanSequence[0]
    assert reference.ReferencedSOPClassUID == RT_ION_PLAN
    assert reference.ReferencedSOPInstanceUID == rp.SOPInstanceUID
    assert ds.SOPInstanceUID not in (rp.SOPInstanceUID, ds.SeriesInstanceUID)
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID


def test_every_written_file_passes_dciodvfy(tmp_path, plan):
    beam2, _ = beam(tmp_path, plan, seed=1, number=2)
    beam3, _ = beam(tmp_path, plan, seed=2, number=3)
    raws = [tmp_path / "beam2.raw", tmp_path / "beam3.raw"]
    plan_raw = to_rtdose(raws, GRID, plan, tmp_path / "plan_raw.dcm", summation="PLAN")
    plan_sum = sum_rtdose([beam2.path, beam3.path], plan, tmp_path / "plan_sum.dcm")
    zero = to_rtdose(
        [write_raw(tmp_path / "zero.raw", np.zeros(GRID.shape))],
        GRID,
        plan,
        tmp_path / "zero.dcm",
        summation="BEAM",
        beam_number=4,
    )
    flat = PhantomGrid(dims=(NX, NY, 1), spacing=GRID.spacing, position=GRID.position)
    single = to_rtdose(
        [write_raw(tmp_path / "single.raw", blob(1)[3])],
        flat,
        plan,
        tmp_path / "single.dcm",
        summation="BEAM",
        beam_number=5,
    )
    single_sum = sum_rtdose([single.path], plan, tmp_path / "single_sum.dcm")
    assert read_dose_gy(single_sum.path).shape == (1, NY, NX)
    assert dciodvfy_available()
    for info in (beam2, beam3, plan_raw, plan_sum, zero, single, single_sum):
        assert dciodvfy_report(info.path) == [], info.path
        assert validate_rtdose(info.path) == []
        assert pydicom.dcmread(info.path).pixel_array.dtype == np.uint16


def test_a_sample_case_plan_gives_a_valid_rtdose(tmp_path):
    """The stand-in case writer's RT Ion Plan (the one the pipeline tests use) works as the source."""
    case = write_sample_case(tmp_path, "Case 1.2", patient_id="PAT 42")
    sample_plan = next(case.glob("RP.*.dcm"))
    raw = write_raw(tmp_path / "beam2.raw", blob(1))
    info = to_rtdose([raw], GRID, sample_plan, tmp_path / "d.dcm", summation="BEAM", beam_number=2)
    ds, rp = pydicom.dcmread(info.path), pydicom.dcmread(sample_plan)
    assert (ds.PatientID, ds.StudyInstanceUID) == ("PAT 42", rp.StudyInstanceUID)
    assert ds.FrameOfReferenceUID == FRAME.uid
    assert dciodvfy_report(info.path) == []


def test_plan_from_raw_is_the_sum_of_beams(tmp_path, plan, chunking):
    doses = [blob(seed) for seed in (1, 2, 3)]
    raws = [write_raw(tmp_path / f"b{n}.raw", d) for n, d in enumerate(doses)]
    info = to_rtdose(raws, GRID, plan, tmp_path / "plan.dcm", summation="PLAN")
    total = sum(doses)
    assert np.abs(read_dose_gy(info.path) - total).max() <= info.scaling / 2 + 1e-12
    assert info.max_dose_gy == pytest.approx(total.max(), rel=1e-12)
    assert info.summation == "PLAN" and info.beam_number is None
    ds = pydicom.dcmread(info.path)
    assert ds.DoseSummationType == "PLAN"
    assert "ReferencedFractionGroupSequence" not in ds.ReferencedRTPlanSequence[0]


def test_sum_rtdose_adds_beam_files(tmp_path, plan, chunking):
    beam2, dose2 = beam(tmp_path, plan, seed=1, number=2)
    beam3, dose3 = beam(tmp_path, plan, seed=2, number=3)
    info = sum_rtdose([beam2.path, beam3.path], plan, tmp_path / "plan.dcm")
    beams_gy = read_dose_gy(beam2.path) + read_dose_gy(beam3.path)
    assert np.abs(read_dose_gy(info.path) - beams_gy).max() <= info.scaling / 2 + 1e-12
    tolerance = info.scaling / 2 + (beam2.scaling + beam3.scaling) / 2 + 1e-12
    assert np.abs(read_dose_gy(info.path) - (dose2 + dose3)).max() <= tolerance
    ds = pydicom.dcmread(info.path)
    assert ds.DoseSummationType == "PLAN"
    assert [float(v) for v in ds.PixelSpacing] == [2.5, 2.0]


def test_sum_rtdose_rejects_another_grid(tmp_path, plan):
    beam2, _ = beam(tmp_path, plan, seed=1, number=2)
    shifted = PhantomGrid(GRID.dims, GRID.spacing, (-12.0, -12.5, -27.0))
    raw = write_raw(tmp_path / "shifted.raw", blob(2))
    other = to_rtdose([raw], shifted, plan, tmp_path / "shifted.dcm", summation="BEAM", beam_number=3)
    with pytest.raises(RtDoseError, match=r"shifted\.dcm: dose grid differs.*position"):
        sum_rtdose([beam2.path, other.path], plan, tmp_path / "plan.dcm")
    assert not (tmp_path / "plan.dcm").exists()


def test_sum_rtdose_rejects_a_dose_of_another_plan(tmp_path, plan):
    beam2, _ = beam(tmp_path, plan, seed=1, number=2)
    other_plan = write_plan(tmp_path / "RP.other.dcm")
    with pytest.raises(RtDoseError, match=r"RTDOSE_beam2\.dcm: references another plan"):
        sum_rtdose([beam2.path], other_plan, tmp_path / "plan.dcm")


def test_all_zero_dose_still_gets_a_positive_scaling(tmp_path, plan):
    raw = write_raw(tmp_path / "zero.raw", np.zeros(GRID.shape))
    info = to_rtdose([raw], GRID, plan, tmp_path / "z.dcm", summation="BEAM", beam_number=1)
    assert info.scaling > 0 and float(pydicom.dcmread(info.path).DoseGridScaling) > 0
    assert info.max_dose_gy == 0.0
    assert not read_dose_gy(info.path).any()


def test_wrong_raw_size_names_file_and_sizes(tmp_path, plan):
    raw = write_raw(tmp_path / "short.raw", np.ones(GRID.voxel_count - 1))
    expected, actual = GRID.voxel_count * 8, (GRID.voxel_count - 1) * 8
    with pytest.raises(RtDoseError, match=rf"short\.raw: raw dose is {actual} bytes, expected {expected}"):
        to_rtdose([raw], GRID, plan, tmp_path / "x.dcm", summation="BEAM", beam_number=1)
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.parametrize("bad", [-1e-3, np.nan, np.inf, -np.inf])
def test_negative_or_non_finite_raw_is_an_error(tmp_path, plan, chunking, bad):
    good = write_raw(tmp_path / "good.raw", blob(1))
    dose = blob(2)
    dose[NZ - 1, 2, 3] = bad  # in the last chunk, after good ones
    raw = write_raw(tmp_path / "bad.raw", dose)
    out = tmp_path / "plan.dcm"
    with pytest.raises(RtDoseError, match=r"bad\.raw: raw dose must be finite and >= 0"):
        to_rtdose([good, raw], GRID, plan, out, summation="PLAN")
    with pytest.raises(RtDoseError, match=r"bad\.raw"):
        to_rtdose([raw], GRID, plan, out, summation="BEAM", beam_number=1)
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_summation_arguments_are_checked(tmp_path, plan):
    raw = write_raw(tmp_path / "b.raw", blob(1))
    out = tmp_path / "x.dcm"
    with pytest.raises(RtDoseError, match="beam number"):
        to_rtdose([raw], GRID, plan, out, summation="BEAM")
    with pytest.raises(RtDoseError, match="exactly one raw file"):
        to_rtdose([raw, raw], GRID, plan, out, summation="BEAM", beam_number=1)
    with pytest.raises(RtDoseError, match="no beam number"):
        to_rtdose([raw], GRID, plan, out, summation="PLAN", beam_number=1)
    with pytest.raises(RtDoseError, match="dose type"):
        to_rtdose([raw], GRID, plan, out, summation="PLAN", dose_type="BIOLOGICAL")


def test_a_file_that_is_not_a_plan_is_rejected(tmp_path, plan):
    info, _ = beam(tmp_path, plan)
    raw = tmp_path / "beam2.raw"
    with pytest.raises(RtDoseError, match=r"RTDOSE_beam2\.dcm: not an RT \(Ion\) Plan"):
        to_rtdose([raw], GRID, info.path, tmp_path / "x.dcm", summation="PLAN")


def test_collect_engine_rtdose_copies_a_valid_file(tmp_path, plan):
    engine, _ = beam(tmp_path, plan)
    out = tmp_path / "collected" / "RTDOSE_beam02.dcm"
    info = collect_engine_rtdose(engine.path, out)
    assert out.read_bytes() == engine.path.read_bytes()
    assert info.sha256 == engine.sha256
    assert info.beam_number == 2 and info.summation == "BEAM"
    assert info.scaling == engine.scaling
    assert info.max_dose_gy == pytest.approx(engine.max_dose_gy, abs=engine.scaling / 2)


def test_collect_engine_rtdose_reads_implicit_vr_32_bit(tmp_path):
    """pydicom's sample RTDOSE: Implicit VR Little Endian, 32-bit pixels, 15 frames."""
    sample = Path(get_testdata_file("rtdose.dcm"))
    info = collect_engine_rtdose(sample, tmp_path / "sample.dcm")
    ds = pydicom.dcmread(sample)
    assert info.max_dose_gy == pytest.approx(ds.pixel_array.max() * float(ds.DoseGridScaling))
    assert info.beam_number == 1 and info.summation == "BEAM"


def _edited(source: Path, target: Path, edit) -> Path:
    ds = pydicom.dcmread(source)
    edit(ds)
    ds.save_as(target)
    return target


def test_collect_engine_rtdose_rejects_zero_scaling(tmp_path, plan):
    engine, _ = beam(tmp_path, plan)
    bad = _edited(engine.path, tmp_path / "zero_scaling.dcm", lambda ds: setattr(ds, "DoseGridScaling", "0"))
    out = tmp_path / "collected.dcm"
    with pytest.raises(RtDoseError, match=r"zero_scaling\.dcm: DoseGridScaling must be > 0"):
        collect_engine_rtdose(bad, out)
    assert not out.exists()


def test_collect_engine_rtdose_rejects_wrong_pixel_length_and_modality(tmp_path, plan):
    engine, _ = beam(tmp_path, plan)

    def drop_a_frame(ds):
        ds.PixelData = ds.PixelData[: NX * NY * 2 * (NZ - 1)]

    short = _edited(engine.path, tmp_path / "short.dcm", drop_a_frame)
    with pytest.raises(RtDoseError, match=r"short\.dcm: PixelData is \d+ bytes, expected"):
        collect_engine_rtdose(short, tmp_path / "c.dcm")
    with pytest.raises(RtDoseError, match=r"RP\.test\.dcm: not an RTDOSE"):
        collect_engine_rtdose(plan, tmp_path / "c.dcm")


def test_validate_rtdose_reports_dciodvfy_errors_with_the_file(tmp_path, plan):
    engine, _ = beam(tmp_path, plan)
    bad = _edited(engine.path, tmp_path / "no_operators.dcm", lambda ds: delattr(ds, "OperatorsName"))
    errors = validate_rtdose(bad)
    assert errors and all(e.startswith(f"{bad}: Error") for e in errors)
    assert any("OperatorsName" in e for e in errors)
    assert validate_rtdose(bad, validator=None) == []


def test_validate_rtdose_checks_frame_offsets(tmp_path, plan):
    engine, _ = beam(tmp_path, plan)
    bad = _edited(engine.path, tmp_path / "offsets.dcm", lambda ds: setattr(ds, "GridFrameOffsetVector", 0.0))
    assert validate_rtdose(bad) == [f"{bad}: GridFrameOffsetVector has 1 values for {NZ} frames"]


def test_validate_rtdose_reports_a_dciodvfy_abort(tmp_path, plan):
    """Debian's dciodvfy asserts (SIGABRT) on 32-bit RTDOSE; an abort must be an error, not a pass."""
    engine, _ = beam(tmp_path, plan)
    aborting = tmp_path / "dciodvfy"
    aborting.write_text("#!/bin/sh\necho 'dciodvfy: attrothr.cc:46: Assertion failed.' >&2\nkill -ABRT $$\n")
    aborting.chmod(0o755)
    errors = validate_rtdose(engine.path, validator=str(aborting))
    assert errors == [
        f"{engine.path}: dciodvfy failed (exit code -6): dciodvfy: attrothr.cc:46: Assertion failed."
    ]


def test_the_calibration_scales_raw_values_to_gy(tmp_path, plan, chunking):
    info, dose = beam(tmp_path, plan, scale=2.5e4)
    back = read_dose_gy(info.path)
    assert info.max_dose_gy == pytest.approx(dose.max() * 2.5e4, rel=1e-12)
    assert np.abs(back - dose * 2.5e4).max() <= info.scaling / 2 + 1e-9


def test_doses_in_different_frames_are_not_summed(tmp_path, plan):
    beam2, _ = beam(tmp_path, plan, number=2)
    raw = write_raw(tmp_path / "other.raw", blob(3))
    other_frame = DoseFrame(uid=generate_uid(), comment="another phantom", label="water phantom")
    other = to_rtdose(
        [raw], GRID, plan, tmp_path / "other.dcm", summation="BEAM", beam_number=3, frame=other_frame
    )
    with pytest.raises(RtDoseError, match="frame of reference .* differs .* cannot be summed"):
        sum_rtdose([beam2.path, other.path], plan, tmp_path / "plan.dcm")
