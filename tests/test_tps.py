"""The engine input of a beam: the profile's keys, typed values, GPUID written once for the GPU held."""

from pathlib import Path

import pydicom
import pytest

from config import ConfigError, load_settings
from standins.sample_case import write_sample_case
from tasks.casefolder import discover_case
from tasks.common.errors import PermanentError
from tasks.interpreter.run import run_interpreter
from tasks.moqui.beam import input_hash
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.inputs import beam_input, tps_values
from tasks.moqui.staging import StagedBeam
from tasks.moqui.tps_file import TPS_KEYS, TpsFormatError, format_tps, parse_tps
from tests.conftest import write_config

PUBLIC_KEYS = set(TPS_KEYS) - {"GPUID", "DicomPath", "NormalizeTotalHistories"}


def interpreted(settings, case_id: str = "CASE 1", **options):
    case = discover_case(
        write_sample_case(settings.scan_dir, case_id, beams=2, machine="G2", **options),
        ready_marker=settings.case.ready_marker,
    )
    return case, run_interpreter(settings, case)


def test_writes_exactly_the_public_profiles_keys(settings):
    case, csv_dir = interpreted(settings)
    beam = case.beams[0]
    written = beam_input(settings, case, beam, csv_dir)
    values = parse_tps(format_tps(written.tps))
    assert set(values) == PUBLIC_KEYS
    assert values["GantryNum"] == "2"  # machine G2
    assert values["BeamNumbers"] == str(beam.number)  # beam 2, behind the SETUP beam
    assert values["UseAbsolutePath"] == "false"  # the public build's absolute mode never finds the logs
    assert values["ParentDir"] == written.stage_dir and Path(written.stage_dir).is_dir()
    assert (values["DicomDir"], values["logFilePath"]) == ("plan", "log")
    assert values["ParticlesPerHistory"] == repr(settings.tps.particles_per_history)
    assert values["OutputDir"] == str(written.dose_dir)
    assert values["OutputFormat"] == "raw" and values["Scorer"] == "Dose"
    assert values["UsingPhantomGeo"] == "true" and values["SourceType"] == "FluenceMap"
    assert written.dose_name == f"{beam.name}_1_Dose.raw"  # the phantom is the world's child 1


def test_the_phantom_is_centred_on_the_beam_axis_below_z_0_in_whole_mm(settings):
    case, csv_dir = interpreted(settings)
    written = beam_input(settings, case, case.beams[0], csv_dir)
    values = parse_tps(written.tps_text(0))
    assert [values[f"PhantomPosition{a}"] for a in "XYZ"] == ["-100", "-100", "-200"]  # 40 x 5 mm
    assert [values[f"PhantomUnit{a}"] for a in "XYZ"] == ["5", "5", "5"]
    grid = PhantomGrid.from_tps(values)
    assert grid == written.grid and grid.position[2] + grid.dims[2] * grid.spacing[2] == 0


def test_gpuid_added_without_changing_anything_else(settings):
    case, csv_dir = interpreted(settings)
    written = beam_input(settings, case, case.beams[0], csv_dir)
    before = parse_tps(format_tps(written.tps))
    after = parse_tps(written.tps_text(1))
    assert after.pop("GPUID") == "1"
    assert after == before
    retry = written.tps_text(0)  # a retry on another GPU: its own GPUID, once
    assert parse_tps(retry)["GPUID"] == "0" and retry.count("GPUID") == 1


def test_input_hash_depends_on_inputs_not_gpu(settings, tmp_path):
    case, csv_dir = interpreted(settings)
    first = beam_input(settings, case, case.beams[0], csv_dir)
    again = beam_input(settings, case, case.beams[0], csv_dir)
    assert first.input_hash == again.input_hash
    layer = sorted(Path(first.stage_dir).glob("log/*/*.csv"))[0]
    layer.write_text(layer.read_text().replace(",0,", ",1,", 1))
    assert input_hash(format_tps(first.tps), Path(first.stage_dir)) != first.input_hash
    finer = load_settings(settings.source, env={"MQI__TPS__PARTICLES_PER_HISTORY": "0.5"})
    assert beam_input(finer, case, case.beams[0], csv_dir).input_hash != first.input_hash


def test_unknown_room_is_refused(settings, tmp_path):
    case = discover_case(write_sample_case(tmp_path / "scan", "C2", machine="PROTON-A"))
    staged = StagedBeam(folder=tmp_path, engine_beam_number=2, records=1)
    with pytest.raises(PermanentError, match="C2: TreatmentMachineName 'PROTON-A' names no gantry room"):
        tps_values(settings, case, staged, tmp_path)


def test_a_path_the_engine_would_cut_is_refused_naming_the_beam(tmp_path):
    root = tmp_path / "data#1"  # the engine's reader cuts a value at '#'
    settings = load_settings(
        write_config(tmp_path, {"paths": {"work_dir": f"{root}/work/{{case_id}}"}}), env={}
    )
    case, csv_dir = interpreted(settings, "C3")
    with pytest.raises(
        PermanentError, match=r"case C3: beam 2 \(1G000:TX\): moqui_tps.in cannot be written: .*'#'"
    ):
        beam_input(settings, case, case.beams[0], csv_dir)


def test_format_refuses_unknown_keys_and_values_the_engine_would_misread():
    with pytest.raises(TpsFormatError, match="unknown moqui_tps.in key.*PhantomDims"):
        format_tps({"PhantomDims": 10})
    with pytest.raises(TpsFormatError, match="cannot be written on one line"):
        format_tps({"OutputDir": "a\nGPUID 3"})
    with pytest.raises(TpsFormatError, match="holds '#'"):
        format_tps({"OutputDir": "/data/case#2/dose"})
    with pytest.raises(TpsFormatError, match="white space"):
        format_tps({"ParentDir": "/data/P1 "})
    assert parse_tps(format_tps({"GPUID": 2, "OverwriteResults": False})) == {
        "GPUID": "2",
        "OverwriteResults": "false",
    }


def test_the_clinic_profile_writes_absolute_folders_and_its_history_key(settings):
    clinic = load_settings(settings.source, env={"MQI__ENGINE__PROFILE": "moqui-smc-clinic"})
    case, csv_dir = interpreted(clinic)
    written = beam_input(clinic, case, case.beams[0], csv_dir)
    values = parse_tps(format_tps(written.tps))
    stage = written.stage_dir
    assert values["UseAbsolutePath"] == "true"
    assert (values["DicomPath"], values["DicomDir"]) == (f"{stage}/plan", f"{stage}/plan")
    assert values["logFilePath"] == f"{stage}/log"
    assert values["NormalizeTotalHistories"] == repr(clinic.tps.particles_per_history)
    assert "ParticlesPerHistory" not in values
    assert written.dose_name == "1G000:TX_*_Dose.raw"  # matched: its middle number is not known


def test_two_centimeter_mode_returns_the_profiles_plane(tmp_path):
    config = write_config(
        tmp_path,
        {"tps": {"two_centimeter_mode": True, "phantom": {"dims": [40, 40, 100], "unit_mm": [5, 5, 2]}}},
    )
    settings = load_settings(config, env={})
    case, csv_dir = interpreted(settings)
    written = beam_input(settings, case, case.beams[0], csv_dir)
    assert written.grid == PhantomGrid(
        dims=(400, 400, 1), spacing=(1.0, 1.0, 2.0), position=(-200.0, -200.0, -1.0)
    )
    assert written.dose_name == "1G000:TX_2_Dose.raw" and written.dose_bytes == 400 * 400 * 8
    with pytest.raises(ConfigError, match="needs at least 160000 phantom voxels"):
        load_settings(config, env={"MQI__TPS__PHANTOM__DIMS": "[40, 40, 40]"})


def test_fractional_millimetres_are_refused_for_a_build_that_reads_whole_ones(tmp_path):
    with pytest.raises(ConfigError, match="whole mm"):
        load_settings(
            write_config(tmp_path, {"tps": {"phantom": {"dims": [40, 40, 40], "unit_mm": [2.5, 2.5, 2]}}}),
            env={},
        )
    clinic = write_config(
        tmp_path, {"engine": {"profile": "moqui-smc-clinic"}, "tps": {"phantom": {"unit_mm": [2.5, 2.5, 2]}}}
    )
    assert load_settings(clinic, env={}).tps.phantom.unit_mm == (2.5, 2.5, 2.0)


def test_the_staged_plan_copy_has_the_beam_where_the_engine_looks(settings):
    case, csv_dir = interpreted(settings)
    written = beam_input(settings, case, case.beams[1], csv_dir)  # beam 3, the SETUP beam first
    plan = pydicom.dcmread(Path(written.stage_dir) / "plan" / "plan.dcm")
    assert [int(b.BeamNumber) for b in plan.IonBeamSequence] == [1, 2, 3]
    first = plan.IonBeamSequence[2].IonControlPointSequence[0]
    assert (
        float(first.GantryAngle) == 0.0
    )  # 90 in the case's plan: the public engine would rotate the phantom
    original = pydicom.dcmread(case.plan_path).IonBeamSequence[2].IonControlPointSequence[0]
    assert float(original.GantryAngle) == 90.0  # the case folder is only read
