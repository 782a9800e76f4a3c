"""The stand-in MOQUI engine: pencil-beam physics, and the tps_env command line as a subprocess."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from standins import pencil_beam
from standins.pencil_beam import Layer, compute_dose
from standins.sample_case import write_sample_case
from standins.tps_env import OUTPUT_NAME_PATTERN
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.tps_file import format_tps

# ---------------------------------------------------------------- physics


def single_spot(energy_mev: float, mu: float = 1.0, xy: tuple[float, float] = (0.0, 0.0)) -> Layer:
    return Layer(energy_mev, np.array([xy]), np.array([mu]))


# Gantry 0 travels +y: 1 mm along the beam, 2 mm across, wide enough to hold the whole spot.
ALONG_Y = PhantomGrid(dims=(40, 200, 40), spacing=(2.0, 1.0, 2.0), position=(-40.0, -100.0, -40.0))


def depth_profile(dose: np.ndarray) -> np.ndarray:
    """Laterally integrated dose along y for the ALONG_Y grid (depth = y + 100 mm)."""
    return dose.sum(axis=(0, 2))


def test_depth_dose_peaks_at_the_bragg_kleeman_range_and_stops_after_it():
    energy = 150.0
    r0 = 10 * pencil_beam.bragg_kleeman_range_cm(energy)
    sigma = 10 * pencil_beam.straggling_sigma_cm(energy)
    profile = depth_profile(compute_dose(ALONG_Y, (0, 0, 0), 0.0, [single_spot(energy)]))
    depth = np.arange(200) + 0.5
    peak = depth[profile.argmax()]
    assert r0 - 5 < peak < r0
    # Bortfeld: the distal 80 % point sits at R0.
    beyond = depth > peak
    distal80 = np.interp(0.8, profile[beyond][::-1] / profile.max(), depth[beyond][::-1])
    assert distal80 == pytest.approx(r0, abs=1.0)
    assert profile[depth > r0 + 4 * sigma].max() < 1e-3 * profile.max()
    assert profile[depth > r0 + 7 * sigma].max() == 0.0


def test_deposited_energy_matches_the_model_in_gray():
    """Dose times voxel mass equals protons times the energy the depth dose deposits."""
    energy, mu = 150.0, 2.0
    dose = compute_dose(ALONG_Y, (0, 0, 0), 0.0, [single_spot(energy, mu)])
    voxel_kg = math.prod(ALONG_Y.spacing) * 1e-6  # water: 1 g/cm^3
    joules = dose.sum() * voxel_kg
    beta_r0 = pencil_beam.BETA_PER_CM * pencil_beam.bragg_kleeman_range_cm(energy)
    p, gamma = pencil_beam.P_EXPONENT, pencil_beam.GAMMA_LOCAL
    deposited_mev = energy * (1 + beta_r0 * (1 + gamma * p) / (1 + p)) / (1 + beta_r0)
    expected = mu * pencil_beam.PROTONS_PER_MU * deposited_mev * 1.602176634e-13
    assert joules == pytest.approx(expected, rel=0.01)


def lateral_sigma_mm(dose: np.ndarray, y_index: int) -> float:
    profile = dose[:, y_index, :].sum(axis=0)
    x = -40 + 2 * (np.arange(40) + 0.5)
    mean = np.average(x, weights=profile)
    return math.sqrt(np.average((x - mean) ** 2, weights=profile))


def test_lateral_width_grows_with_depth():
    energy = 150.0
    r0 = 10 * pencil_beam.bragg_kleeman_range_cm(energy)
    dose = compute_dose(ALONG_Y, (0, 0, 0), 0.0, [single_spot(energy)])
    shallow = lateral_sigma_mm(dose, 10)
    deep = lateral_sigma_mm(dose, int(r0) - 5)
    # At the surface the in-air spot (plus the 2 mm voxel's own width) is all there is.
    at_surface = math.hypot(pencil_beam.DEFAULT_SPOT_SIGMA_MM, 2 / math.sqrt(12))
    assert shallow == pytest.approx(at_surface, abs=0.1)
    assert deep > shallow + 1.0


CUBE = PhantomGrid(dims=(60, 60, 20), spacing=(2.0, 2.0, 2.0), position=(-60.0, -60.0, -20.0))


@pytest.mark.parametrize(
    ("gantry", "axis", "sign"),
    [(0.0, "y", +1), (90.0, "x", -1), (180.0, "y", -1), (270.0, "x", +1)],
)
def test_gantry_angle_sets_the_beam_direction(gantry, axis, sign):
    energy = 100.0
    r0 = 10 * pencil_beam.bragg_kleeman_range_cm(energy)
    dose = compute_dose(CUBE, (0, 0, 0), gantry, [single_spot(energy)])
    centres = -60 + 2 * (np.arange(60) + 0.5)
    along = dose.sum(axis=(0, 2) if axis == "y" else (0, 1))
    across = dose.sum(axis=(0, 1) if axis == "y" else (0, 2))
    entrance = -60.0 if sign > 0 else 60.0
    peak_depth = sign * (centres[along.argmax()] - entrance)
    assert r0 - 6 < peak_depth < r0 + 1
    assert np.average(centres, weights=across) == pytest.approx(0.0, abs=0.2)


def test_spot_position_maps_to_patient_axes():
    """BEV x lies in the rotation plane (+x at gantry 0, +y at gantry 90); BEV y is patient z."""
    centres = -60 + 2 * (np.arange(60) + 0.5)
    z_centres = -20 + 2 * (np.arange(20) + 0.5)
    for gantry, bev_x_axis in ((0.0, (0, 1)), (90.0, (0, 2))):
        dose = compute_dose(CUBE, (0, 0, 0), gantry, [single_spot(100.0, xy=(20.0, -10.0))])
        assert np.average(centres, weights=dose.sum(axis=bev_x_axis)) == pytest.approx(20, abs=0.3)
        assert np.average(z_centres, weights=dose.sum(axis=(1, 2))) == pytest.approx(-10, abs=0.3)


def test_dose_is_linear_in_mu_and_additive_over_layers():
    spots = np.array([[0.0, 0.0], [10.0, 5.0], [-10.0, 0.0]])
    low = Layer(90.0, spots, np.array([0.5, 1.0, 0.2]))
    high = Layer(110.0, spots, np.array([1.0, 0.3, 0.7]))
    single = compute_dose(CUBE, (0, 0, 0), 30.0, [low])
    doubled = compute_dose(CUBE, (0, 0, 0), 30.0, [Layer(90.0, spots, 2 * low.mu)])
    np.testing.assert_allclose(doubled, 2 * single, rtol=1e-12)
    both = compute_dose(CUBE, (0, 0, 0), 30.0, [low, high])
    np.testing.assert_allclose(
        both, single + compute_dose(CUBE, (0, 0, 0), 30.0, [high]), rtol=1e-12, atol=1e-15
    )


# ---------------------------------------------------------------- command line

ENGINE_GRID = PhantomGrid(dims=(50, 50, 50), spacing=(4.0, 4.0, 4.0), position=(-100.0, -100.0, -100.0))
# The sample case's treatment beams at gantry 0 and 90 (beam 1 is its SETUP field).
BEAMS = {2: "1G000:TX", 3: "2G090:TX"}
LAYERS = 3


@pytest.fixture(scope="module")
def interpreted_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample case run through the interpreter stand-in: `<out>/plan/` and `<out>/log/`."""
    root = tmp_path_factory.mktemp("case")
    case = write_sample_case(root / "scan", "CASE1", beams=len(BEAMS), layers=LAYERS, spots_per_layer=9)
    out = root / "interpreted"
    subprocess.run(
        [sys.executable, "-m", "standins.interpreter", "--logdir", str(case), "--outputdir", str(out)],
        env=engine_env(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture
def engine_dir(tmp_path: Path, interpreted_case: Path) -> Path:
    """The engine's working directory; the input names the case by paths relative to it."""
    root = tmp_path / "engine"
    shutil.copytree(interpreted_case, root / "case")
    (root / "case" / "plan" / "notes.txt").write_text("not DICOM: the plan is found by its header")
    write_input(root)
    return root


def csv_layers(log_dir: Path) -> list[Layer]:
    """The interpreter's layers for one beam, read independently of the engine's reader."""
    layers = []
    for path in sorted(log_dir.glob("*MeV.csv")):
        rows = np.loadtxt(path, delimiter=",", ndmin=2)
        layers.append(Layer(float(path.name[3:-7]), rows[:, 1:3], rows[:, 3]))
    return layers


def tps_values(**overrides: object) -> dict[str, object]:
    nx, ny, nz = ENGINE_GRID.dims
    dx, dy, dz = ENGINE_GRID.spacing
    px, py, pz = ENGINE_GRID.position
    values: dict[str, object] = {
        "GPUID": 0,
        "RandomSeed": 1234,
        "UseAbsolutePath": False,
        "TotalThreads": -1,
        "MaxHistoriesPerBatch": 100000,
        "Verbosity": 0,
        "ParentDir": ".",
        "DicomDir": "case/plan",
        "logFilePath": "case/log",
        "GantryNum": 2,
        "BeamNumbers": 2,
        "UsingPhantomGeo": True,
        "TwoCentimeterMode": True,
        "PhantomDimX": nx,
        "PhantomDimY": ny,
        "PhantomDimZ": nz,
        "PhantomUnitX": dx,
        "PhantomUnitY": dy,
        "PhantomUnitZ": dz,
        "PhantomPositionX": px,
        "PhantomPositionY": py,
        "PhantomPositionZ": pz,
        "Scorer": "Dose",
        "SupressStd": True,
        "ReadStructure": False,
        "SourceType": "FluenceMap",
        "SimulationType": "perBeam",
        "ScoreToCTGrid": False,
        "OutputDir": "out",
        "OutputFormat": "raw",
        "OverwriteResults": False,
    }
    values.update(overrides)
    return {key: value for key, value in values.items() if value is not None}


def write_input(root: Path, name: str = "moqui_tps.in", **overrides: object) -> str:
    (root / name).write_text(format_tps(tps_values(**overrides)))
    return name


def engine_command(input_name: str) -> list[str]:
    return [sys.executable, "-m", "standins.tps_env", input_name]


def engine_env(**faults: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQI_STANDIN_")}
    env.update(faults)
    return env


def run_engine(root: Path, input_name: str = "moqui_tps.in", **faults: str):
    return subprocess.run(
        engine_command(input_name),
        cwd=root,
        env=engine_env(**faults),
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("ERROR:")]


def output_path(root: Path, beam: int = 2, ext: str = "raw") -> Path:
    name = OUTPUT_NAME_PATTERN.format(beam_name=BEAMS[beam], beam_number=beam, scorer="Dose", ext=ext)
    return root / "out" / name


def test_engine_logs_progress_and_writes_the_raw_dose(engine_dir: Path):
    result = run_engine(engine_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    batches = LAYERS
    assert f"Simulating beam 2 (1G000:TX) with {batches} batches" in lines
    progress = [line for line in lines if line.startswith("Generating particles")]
    assert progress == [f"Generating particles for ({k} of {batches} batches)" for k in range(1, batches + 1)]
    assert re.fullmatch(r"Total execution time: \d+\.\d\d s", lines[-1])
    assert not error_lines(result.stdout)
    output = output_path(engine_dir)
    assert output.name == "1G000:TX_2_Dose.raw"
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name]  # no temp file left
    assert output.stat().st_size == ENGINE_GRID.voxel_count * 8
    dose = np.fromfile(output, dtype=np.float64).reshape(ENGINE_GRID.shape)
    # Gantry 0, isocentre at the origin (the sample plan), layers as the interpreter wrote them.
    layers = csv_layers(engine_dir / "case" / "log" / "1G000_TX")
    expected = compute_dose(ENGINE_GRID, (0, 0, 0), 0.0, layers)
    assert expected.max() > 0
    np.testing.assert_allclose(dose, expected, rtol=1e-6, atol=1e-9)


def test_engine_writes_npz_and_refuses_formats_it_cannot_write(engine_dir: Path):
    result = run_engine(engine_dir, write_input(engine_dir, "npz.in", OutputFormat="npz", BeamNumbers=3))
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(output_path(engine_dir, beam=3, ext="npz")) as saved:
        assert saved["dose"].shape == ENGINE_GRID.shape
    result = run_engine(engine_dir, write_input(engine_dir, "dcm.in", OutputFormat="dcm"))
    assert result.returncode == 1
    assert "not supported by the stand-in" in error_lines(result.stdout)[0]


def test_engine_keeps_an_existing_result_unless_told_to_overwrite(engine_dir: Path):
    assert run_engine(engine_dir).returncode == 0
    result = run_engine(engine_dir)
    assert result.returncode == 1
    assert "OverwriteResults" in error_lines(result.stdout)[0]
    result = run_engine(engine_dir, write_input(engine_dir, "again.in", OverwriteResults=True))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("key", ["DicomDir", "OutputDir", "PhantomDimY", "BeamNumbers", "GPUID"])
def test_missing_key_is_an_error_naming_it(engine_dir: Path, key: str):
    result = run_engine(engine_dir, write_input(engine_dir, "bad.in", **{key: None}))
    assert result.returncode == 1
    assert key in error_lines(result.stdout)[0]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"logFilePath": "case/nolog"}, "case/nolog"),
        ({"DicomDir": "case/noplan"}, "case/noplan"),
        ({"BeamNumbers": 7}, "BeamNumbers 7"),
        ({"GantryNum": 0}, "GantryNum"),
    ],
)
def test_bad_input_is_an_error_naming_the_culprit(engine_dir: Path, overrides, named: str):
    result = run_engine(engine_dir, write_input(engine_dir, "bad.in", **overrides))
    assert result.returncode == 1
    assert named in error_lines(result.stdout)[0]


def test_missing_input_file_is_an_error(engine_dir: Path):
    result = run_engine(engine_dir, "absent.in")
    assert result.returncode == 1
    assert "absent.in" in error_lines(result.stdout)[0]


# ---------------------------------------------------------------- injected faults


def launch_records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_error_fault_prints_an_error_marker_and_exits_1(engine_dir: Path):
    result = run_engine(engine_dir, MQI_STANDIN_ENGINE_FAULT="error")
    assert result.returncode == 1
    assert f"Generating particles for (1 of {LAYERS} batches)" in result.stdout
    assert error_lines(result.stdout)
    assert not output_path(engine_dir).exists()


def test_segfault_fault_dies_by_sigsegv(engine_dir: Path):
    result = run_engine(engine_dir, MQI_STANDIN_ENGINE_FAULT="segfault")
    assert result.returncode == -signal.SIGSEGV


def test_fault_keys_limit_the_fault_to_those_beams(engine_dir: Path):
    result = run_engine(engine_dir, MQI_STANDIN_ENGINE_FAULT="error", MQI_STANDIN_ENGINE_FAULT_KEYS="3")
    assert result.returncode == 0, result.stdout + result.stderr


def test_fail_first_fails_the_first_launches_then_succeeds(engine_dir: Path, tmp_path: Path):
    log = tmp_path / "launches.jsonl"
    env = {"MQI_STANDIN_ENGINE_FAIL_FIRST": "2", "MQI_STANDIN_LAUNCH_LOG": str(log)}
    codes = [run_engine(engine_dir, **env).returncode for _ in range(3)]
    assert codes == [1, 1, 0]
    records = launch_records(log)
    starts = [r for r in records if r["event"] == "start"]
    assert [r["attempt"] for r in starts] == [1, 2, 3]
    assert {(r["tool"], r["key"], r["gpu"]) for r in starts} == {("engine", "2", 0)}
    assert {r["input"] for r in starts} == {str((engine_dir / "moqui_tps.in").resolve())}
    assert {r["cwd"] for r in starts} == {str(engine_dir.resolve())}
    assert [r["exit"] for r in records if r["event"] == "end"] == [1, 1, 0]


def test_hang_fault_starts_then_never_finishes(engine_dir: Path, tmp_path: Path):
    log = tmp_path / "launches.jsonl"
    with subprocess.Popen(
        engine_command("moqui_tps.in"),
        cwd=engine_dir,
        stdout=subprocess.PIPE,
        text=True,
        env=engine_env(MQI_STANDIN_ENGINE_FAULT="hang", MQI_STANDIN_LAUNCH_LOG=str(log)),
    ) as engine:
        try:
            assert engine.stdout is not None
            for line in engine.stdout:  # the progress line is flushed before the hang
                if line.startswith("Generating particles"):
                    break
            with pytest.raises(subprocess.TimeoutExpired):
                engine.wait(timeout=1.0)
        finally:
            engine.kill()
    assert [r["event"] for r in launch_records(log)] == ["start"]


def test_duration_mode_writes_a_right_sized_file_after_the_given_time(engine_dir: Path):
    result = run_engine(engine_dir, MQI_STANDIN_ENGINE_DURATION="0.3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Generating particles for ({LAYERS} of {LAYERS} batches)" in result.stdout
    total = re.search(r"Total execution time: (\d+\.\d\d) s", result.stdout)
    assert total is not None and float(total[1]) >= 0.3  # a lower bound: sleeping guarantees it
    dose = np.fromfile(output_path(engine_dir), dtype=np.float64)
    assert dose.size == ENGINE_GRID.voxel_count
    assert dose.sum() == 27.0
