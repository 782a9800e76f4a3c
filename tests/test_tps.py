"""The engine input of a beam: exactly the known keys, typed values, GPUID written once for the GPU held."""

import pytest

from standins.sample_case import write_sample_case
from tasks.casefolder import discover_case
from tasks.common.errors import PermanentError
from tasks.moqui.beam import input_hash
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.inputs import beam_input, phantom_grid, tps_values
from tasks.moqui.tps_file import TPS_KEYS, TpsFormatError, format_tps, parse_tps

EXPECTED_KEYS = set(TPS_KEYS) - {"GPUID"}


@pytest.fixture
def case(tmp_path, settings):
    case_dir = write_sample_case(tmp_path / "scan", "CASE 1", beams=2, machine="G2")
    return discover_case(case_dir)


def test_writes_exactly_the_known_keys(settings, case, tmp_path):
    csv_dir = tmp_path / "Log_csv"
    beam = case.beams[0]
    written = beam_input(settings, case, beam, csv_dir)
    values = parse_tps(format_tps(written.tps))
    assert set(values) == EXPECTED_KEYS
    assert values["GantryNum"] == "2"  # machine G2
    assert values["BeamNumbers"] == str(beam.number)
    assert values["DicomDir"] == str(csv_dir / "plan")
    assert values["logFilePath"] == str(csv_dir / "log")
    assert values["OutputDir"] == str(written.dose_dir)
    assert values["OutputFormat"] == "raw" and values["Scorer"] == "Dose"
    assert values["UsingPhantomGeo"] == "true" and values["SourceType"] == "FluenceMap"
    assert str(written.dose_file).endswith(f"/{beam.name}_{beam.number}_Dose.raw")


def test_phantom_centred_on_the_isocentre(settings, case, tmp_path):
    beam = case.beams[0]
    written = beam_input(settings, case, beam, tmp_path / "Log_csv")
    grid = PhantomGrid.from_tps(parse_tps(written.tps_text(0)))
    assert grid == written.grid
    assert grid.dims == (40, 40, 40) and grid.spacing == (5.0, 5.0, 5.0)
    centre = [p + d * s / 2 for p, d, s in zip(grid.position, grid.dims, grid.spacing, strict=True)]
    assert centre == pytest.approx(list(beam.isocenter_mm))


def test_gpuid_added_without_changing_anything_else(settings, case, tmp_path):
    written = beam_input(settings, case, case.beams[0], tmp_path / "Log_csv")
    before = parse_tps(format_tps(written.tps))
    after = parse_tps(written.tps_text(1))
    assert after.pop("GPUID") == "1"
    assert after == before
    retry = written.tps_text(0)  # a retry on another GPU: its own GPUID, once
    assert parse_tps(retry)["GPUID"] == "0" and retry.count("GPUID") == 1


def test_input_hash_depends_on_inputs_not_gpu(settings, case, tmp_path):
    csv_dir = tmp_path / "Log_csv"
    beam_dir = csv_dir / "log" / case.beams[0].csv_dir_name
    beam_dir.mkdir(parents=True)
    (beam_dir / "01_150.00MeV.csv").write_text("0,1,2,3\n")
    first = beam_input(settings, case, case.beams[0], csv_dir)
    again = beam_input(settings, case, case.beams[0], csv_dir)
    assert first.input_hash == again.input_hash
    (beam_dir / "01_150.00MeV.csv").write_text("0,1,2,4\n")
    assert input_hash(format_tps(first.tps), csv_dir, first.csv_dir_name) != first.input_hash


def test_unknown_room_is_refused(settings, tmp_path):
    case = discover_case(write_sample_case(tmp_path / "scan", "C2", machine="PROTON-A"))
    with pytest.raises(PermanentError, match="C2: TreatmentMachineName 'PROTON-A' names no gantry room"):
        tps_values(settings, case, case.beams[0], tmp_path, tmp_path, phantom_grid(settings, case.beams[0]))


def test_format_refuses_unknown_keys_and_multiline_values():
    with pytest.raises(TpsFormatError, match="unknown moqui_tps.in key.*ParticlesPerHistory"):
        format_tps({"ParticlesPerHistory": 10})
    with pytest.raises(TpsFormatError, match="cannot be written on one line"):
        format_tps({"OutputDir": "a\nGPUID 3"})
    assert parse_tps(format_tps({"GPUID": 2, "OverwriteResults": False})) == {
        "GPUID": "2",
        "OverwriteResults": "false",
    }
