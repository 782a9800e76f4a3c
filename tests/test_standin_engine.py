"""The stand-in MOQUI engine: pencil-beam physics, and tps_env's command line, input rules, files,
log lines and exit codes as the public engine's source has them, run as a subprocess."""

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
import pydicom
import pytest

from config.profiles import shipped_profiles
from standins import pencil_beam
from standins.pencil_beam import COUNTS_PER_MU, Layer, compute_dose
from standins.sample_case import write_sample_case
from tasks.casefolder import discover_case
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.staging import stage_beam
from tasks.moqui.tps_file import format_tps

PUBLIC = shipped_profiles()["moqui-smc-public"]

# ---------------------------------------------------------------- physics


def single_spot(energy_mev: float, mu: float = 1.0, xy: tuple[float, float] = (0.0, 0.0)) -> Layer:
    return Layer(energy_mev, np.array([xy]), np.array([mu]))


# The engine's beam-aligned phantom: the beam travels -z into the top face at z = 0.
DEEP = PhantomGrid(dims=(40, 40, 200), spacing=(2.0, 2.0, 1.0), position=(-40.0, -40.0, -200.0))


def depth_profile(dose: np.ndarray) -> np.ndarray:
    """Laterally integrated dose by depth for the DEEP grid (index 0 at the surface)."""
    return dose.sum(axis=(1, 2))[::-1]


def test_depth_dose_peaks_at_the_bragg_kleeman_range_and_stops_after_it():
    energy = 150.0
    r0 = 10 * pencil_beam.bragg_kleeman_range_cm(energy)
    sigma = 10 * pencil_beam.straggling_sigma_cm(energy)
    profile = depth_profile(compute_dose(DEEP, [single_spot(energy)]))
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
    dose = compute_dose(DEEP, [single_spot(energy, mu)])
    voxel_kg = math.prod(DEEP.spacing) * 1e-6  # water: 1 g/cm^3
    joules = dose.sum() * voxel_kg
    beta_r0 = pencil_beam.BETA_PER_CM * pencil_beam.bragg_kleeman_range_cm(energy)
    p, gamma = pencil_beam.P_EXPONENT, pencil_beam.GAMMA_LOCAL
    deposited_mev = energy * (1 + beta_r0 * (1 + gamma * p) / (1 + p)) / (1 + beta_r0)
    expected = mu * pencil_beam.PROTONS_PER_MU * deposited_mev * 1.602176634e-13
    assert joules == pytest.approx(expected, rel=0.01)


def lateral_sigma_mm(dose: np.ndarray, depth_mm: int) -> float:
    profile = dose[199 - depth_mm].sum(axis=0)  # across x at that depth
    x = -40 + 2 * (np.arange(40) + 0.5)
    mean = np.average(x, weights=profile)
    return math.sqrt(np.average((x - mean) ** 2, weights=profile))


def test_lateral_width_grows_with_depth():
    energy = 150.0
    r0 = 10 * pencil_beam.bragg_kleeman_range_cm(energy)
    dose = compute_dose(DEEP, [single_spot(energy)])
    shallow = lateral_sigma_mm(dose, 10)
    deep = lateral_sigma_mm(dose, int(r0) - 5)
    # At the surface the in-air spot (plus the 2 mm voxel's own width) is all there is.
    at_surface = math.hypot(pencil_beam.DEFAULT_SPOT_SIGMA_MM, 2 / math.sqrt(12))
    assert shallow == pytest.approx(at_surface, abs=0.1)
    assert deep > shallow + 1.0


CUBE = PhantomGrid(dims=(60, 60, 60), spacing=(2.0, 2.0, 2.0), position=(-60.0, -60.0, -120.0))


def test_a_spots_x_and_y_are_the_phantoms_x_and_y():
    centres = -60 + 2 * (np.arange(60) + 0.5)
    dose = compute_dose(CUBE, [single_spot(100.0, xy=(20.0, -10.0))])
    assert np.average(centres, weights=dose.sum(axis=(0, 1))) == pytest.approx(20, abs=0.3)
    assert np.average(centres, weights=dose.sum(axis=(0, 2))) == pytest.approx(-10, abs=0.3)


def test_a_surface_above_the_grid_moves_the_dose_deeper():
    plane = PhantomGrid(dims=(60, 60, 1), spacing=(2.0, 2.0, 2.0), position=(-60.0, -60.0, -1.0))
    surface = compute_dose(plane, [single_spot(150.0)], surface_mm=1.0)  # the plane at 0-2 mm depth
    under = compute_dose(plane, [single_spot(150.0)], surface_mm=20.0)  # at 19-21 mm, as in 2 cm mode
    assert under.max() > surface.max() > 0  # the entrance dose rises with depth


def test_dose_is_linear_in_mu_and_additive_over_layers():
    spots = np.array([[0.0, 0.0], [10.0, 5.0], [-10.0, 0.0]])
    low = Layer(90.0, spots, np.array([0.5, 1.0, 0.2]))
    high = Layer(110.0, spots, np.array([1.0, 0.3, 0.7]))
    single = compute_dose(CUBE, [low])
    doubled = compute_dose(CUBE, [Layer(90.0, spots, 2 * low.mu)])
    np.testing.assert_allclose(doubled, 2 * single, rtol=1e-12)
    both = compute_dose(CUBE, [low, high])
    np.testing.assert_allclose(both, single + compute_dose(CUBE, [high]), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- command line

ENGINE_GRID = PhantomGrid(dims=(50, 50, 50), spacing=(4.0, 4.0, 4.0), position=(-100.0, -100.0, -200.0))
# The sample case's treatment beams (beam 1 is its SETUP field).
BEAMS = {2: "1G000:TX", 3: "2G090:TX"}
LAYERS = 3
PPH = 0.5


@pytest.fixture(scope="module")
def interpreted_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A sample case and its interpreter output (`<out>/plan/`, `<out>/log/`)."""
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
    return case, out


@pytest.fixture
def engine_dir(tmp_path: Path, interpreted_case: tuple[Path, Path]) -> Path:
    """The engine's working directory: `stage/` holds beam 2's staged input (plan/, log/)."""
    case_dir, out = interpreted_case
    case = discover_case(case_dir)
    root = tmp_path / "engine"
    stage_beam(PUBLIC, Path(case.plan_path), out, case.beams[0], root / "stage", "test")
    shutil.copytree(out, root / "interpreted")
    plan_path = next((root / "interpreted" / "plan").glob("*.dcm"))
    plan = pydicom.dcmread(plan_path)
    for item in plan.IonBeamSequence:  # what the angle rule alone would refuse
        item.IonControlPointSequence[0].GantryAngle = "0"
    plan.save_as(plan_path)
    (root / "stage" / "plan" / "notes.txt").write_text("not DICOM: the plan is found by its header")
    write_input(root)
    return root


def engine_layers(folder: Path, pph: float = PPH) -> list[Layer]:
    """A staged beam's layers as the engine reads them, read here independently: MU = int(count x pph)."""
    layers = []
    for path in sorted(folder.glob("*MeV.csv")):
        rows = np.array([[float(v) for v in line.split(",")[:4]] for line in path.read_text().splitlines()])
        counts = np.trunc(rows[:, 3] * pph)
        layers.append(Layer(float(path.name[3:-7]), rows[:, 1:3], counts / COUNTS_PER_MU))
    return layers


def tps_values(**overrides: object) -> dict[str, object]:
    nx, ny, nz = ENGINE_GRID.dims
    dx, dy, dz = (int(v) for v in ENGINE_GRID.spacing)
    px, py, pz = (int(v) for v in ENGINE_GRID.position)
    values: dict[str, object] = {
        "GPUID": 0,
        "RandomSeed": 1234,
        "UseAbsolutePath": False,
        "TotalThreads": -1,
        "MaxHistoriesPerBatch": 1000,
        "ParentDir": "stage",
        "DicomDir": "plan",
        "logFilePath": "log",
        "GantryNum": 2,
        "BeamNumbers": 2,
        "UsingPhantomGeo": True,
        "TwoCentimeterMode": False,
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
        "SourceType": "FluenceMap",
        "SimulationType": "perBeam",
        "ParticlesPerHistory": PPH,
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


def what(result) -> str:
    """The engine's abort: SIGABRT, and the exception's message on stderr."""
    assert result.returncode == -signal.SIGABRT, (result.returncode, result.stdout, result.stderr)
    assert "terminate called after throwing an instance of" in result.stderr
    return result.stderr.split("what():", 1)[1].strip()


def reported(stdout: str, label: str) -> int:
    return int(re.search(rf"Total {label} : (\d+)", stdout)[1])


def output_path(root: Path, beam: int = 2, child: int = 1) -> Path:
    return root / "out" / f"{BEAMS[beam]}_{child}_Dose.raw"


def test_engine_logs_its_lines_and_writes_the_raw_dose(engine_dir: Path):
    result = run_engine(engine_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Creating beam source object.. : Currently selected beam --> 2 (1G000:TX)" in lines
    folder = next((engine_dir / "stage" / "log").glob("*_1G000_TX"))
    records = sum(len(p.read_text().splitlines()) for p in folder.glob("*.csv"))
    histories = sum(int(c) for layer in engine_layers(folder) for c in layer.mu * COUNTS_PER_MU)
    assert reported(result.stdout, r"beamlets \(Spots\)") == records
    assert reported(result.stdout, r"histories \(Particles\)") == histories
    batches = math.ceil(histories / 1000)
    assert f"Uploading particles with batch.. : Particle count --> 1000 with {batches} batches" in lines
    progress = [line for line in lines if line.startswith("Generating particles")]
    assert progress == [
        f"Generating particles for ({k} of {batches} batches) in CPU .." for k in range(1, batches + 1)
    ]
    assert re.fullmatch(r"Time taken by MC engine: \d+\.\d milli-seconds", lines[-1])
    output = output_path(engine_dir)
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name]  # no temp file left
    dose = np.fromfile(output, dtype="<f8").reshape(ENGINE_GRID.shape)
    expected = compute_dose(ENGINE_GRID, engine_layers(folder)) * PPH  # scaled by pph, as the engine does
    assert expected.max() > 0
    np.testing.assert_allclose(dose, expected, rtol=1e-6, atol=1e-12)


def test_beam_numbers_pick_the_plan_beam_by_number_but_name_and_logs_by_position(engine_dir: Path):
    """Handed the interpreter's output as it is (the SETUP beam has no folder), beam 2 reads beam 3's logs."""
    result = run_engine(
        engine_dir, write_input(engine_dir, "raw.in", ParentDir="interpreted", OverwriteResults=True)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Currently selected beam --> 2 (1G000:TX)" in result.stdout
    assert "interpreted/log/2G090_TX/" in result.stdout and "interpreted/log/1G000_TX/" not in result.stdout
    folder = engine_dir / "interpreted/log/2G090_TX"
    rows = [len(p.read_text().splitlines()) for p in folder.glob("*.csv")]
    # the rows are misread (see the next test): groups of four tokens, split at commas only
    assert reported(result.stdout, r"beamlets \(Spots\)") == sum((3 * n + 1) // 4 for n in rows)
    last = run_engine(
        engine_dir,
        write_input(engine_dir, "last.in", ParentDir="interpreted", BeamNumbers=3, OverwriteResults=True),
    )
    assert reported(last.stdout, r"beamlets \(Spots\)") == 0  # no third folder: nothing read, exit 0
    assert last.returncode == 0 and not np.fromfile(output_path(engine_dir, beam=3), dtype="<f8").any()


def test_rows_without_a_trailing_comma_are_misread_as_the_engine_misreads_them(engine_dir: Path):
    folder = next((engine_dir / "stage" / "log").glob("*_1G000_TX"))
    for path in folder.glob("*.csv"):
        path.write_text("".join(line.rstrip(",") + "\r\n" for line in path.read_text().splitlines()))
    result = run_engine(engine_dir)
    rows = [len(p.read_text().splitlines()) for p in folder.glob("*.csv")]
    assert reported(result.stdout, r"beamlets \(Spots\)") == sum((3 * n + 1) // 4 for n in rows)


def test_without_particles_per_history_the_histories_wrap_and_nothing_is_simulated(engine_dir: Path):
    result = run_engine(engine_dir, write_input(engine_dir, "nopph.in", ParticlesPerHistory=None))
    assert result.returncode == 0, result.stdout + result.stderr
    assert reported(result.stdout, r"histories \(Particles\)") > 2**63  # -1 per record, summed unsigned
    assert "Generating particles" not in result.stdout
    assert not np.fromfile(output_path(engine_dir), dtype="<f8").any()


def test_the_absolute_mode_never_finds_the_log_folder(engine_dir: Path):
    result = run_engine(engine_dir, write_input(engine_dir, "abs.in", UseAbsolutePath=True))
    assert what(result) == "Log Dir is not provided"


def test_an_output_folder_that_cannot_be_made_says_so_and_exits_0(engine_dir: Path):
    result = run_engine(engine_dir, write_input(engine_dir, "deep.in", OutputDir="out/a/b"))
    assert result.returncode == 0, result.stderr
    assert f"Cannot write :out/a/b/{BEAMS[2]}_1_Dose.raw" in result.stdout
    assert not (engine_dir / "out").exists()


def test_the_input_is_read_the_engines_way(engine_dir: Path):
    text = format_tps(tps_values()).replace("BeamNumbers 2", "beamnumbers 2 # the first wins\nBeamNumbers 3")
    (engine_dir / "case.in").write_text(text)
    result = run_engine(engine_dir, "case.in")
    assert result.returncode == 0 and "Currently selected beam --> 2 (1G000:TX)" in result.stdout
    (engine_dir / "blank.in").write_text(format_tps(tps_values()) + "   \n")
    assert "basic_string::substr" in what(run_engine(engine_dir, "blank.in"))


def test_a_phantom_the_plans_angles_would_rotate_is_refused(engine_dir: Path, interpreted_case):
    out = interpreted_case[1]
    shutil.copy(next((out / "plan").glob("*.dcm")), engine_dir / "stage" / "plan" / "plan.dcm")
    result = run_engine(
        engine_dir, write_input(engine_dir, "turned.in", BeamNumbers=3)
    )  # its plan as exported
    assert "'GantryAngle': 90.0" in what(result) and "rotates" in what(result)


def test_two_centimeter_mode_scores_the_plane(engine_dir: Path):
    plane = PUBLIC.two_centimeter_plane
    big = {"PhantomDimX": 400, "PhantomDimY": 400, "PhantomDimZ": 1, "TwoCentimeterMode": True}
    result = run_engine(engine_dir, write_input(engine_dir, "plane.in", **big))
    assert result.returncode == 0, result.stdout + result.stderr
    dose = np.fromfile(output_path(engine_dir, child=2), dtype="<f8")
    assert dose.size == math.prod(plane.dims) and dose.max() > 0
    small = run_engine(
        engine_dir, write_input(engine_dir, "small.in", TwoCentimeterMode=True, OverwriteResults=True)
    )
    assert "hangs" in what(small)


def test_engine_keeps_an_existing_result_unless_told_to_overwrite(engine_dir: Path):
    assert run_engine(engine_dir).returncode == 0
    assert what(run_engine(engine_dir)) == "Output directory exists."
    result = run_engine(engine_dir, write_input(engine_dir, "again.in", OverwriteResults=True))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ParentDir": None}, "ParentDir is not provided"),
        ({"OutputDir": None}, "Output directory is not provided."),
        ({"BeamNumbers": None}, "basic_string::substr"),
        ({"DicomDir": "noplan"}, "There is no RTPLAN in the path. Exiting."),
        ({"logFilePath": "nolog"}, "directory iterator cannot open directory"),
        ({"BeamNumbers": 7}, "Invalid beam number."),
        ({"GantryNum": 0}, "GantryNum"),
        ({"Scorer": "DoseToWater"}, "Unrecognized scorer name"),
    ],
)
def test_bad_input_aborts_naming_the_culprit(engine_dir: Path, overrides, message: str):
    assert message in what(run_engine(engine_dir, write_input(engine_dir, "bad.in", **overrides)))


def test_missing_input_file_aborts(engine_dir: Path):
    assert what(run_engine(engine_dir, "absent.in")) == "Cannot open input parameter file."


# ---------------------------------------------------------------- injected faults


def launch_records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_error_fault_prints_a_cuda_error_and_exits_255(engine_dir: Path):
    result = run_engine(engine_dir, MQI_STANDIN_ENGINE_FAULT="error")
    assert result.returncode == 255
    assert "Generating particles for (1 of " in result.stdout
    assert re.search(r"^CUDA error: .*injected error", result.stdout, re.M)
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
    write_input(engine_dir, OverwriteResults=True)
    codes = [run_engine(engine_dir, **env).returncode for _ in range(3)]
    assert codes == [255, 255, 0]
    records = launch_records(log)
    starts = [r for r in records if r["event"] == "start"]
    assert [r["attempt"] for r in starts] == [1, 2, 3]
    assert {(r["tool"], r["key"], r["gpu"]) for r in starts} == {("engine", "2", 0)}
    assert {r["input"] for r in starts} == {str((engine_dir / "moqui_tps.in").resolve())}
    assert {r["cwd"] for r in starts} == {str(engine_dir.resolve())}
    assert [r["exit"] for r in records if r["event"] == "end"] == [255, 255, 0]


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
    total = re.search(r"Time taken by MC engine: (\d+\.\d) milli-seconds", result.stdout)
    assert total is not None and float(total[1]) >= 300  # a lower bound: sleeping guarantees it
    dose = np.fromfile(output_path(engine_dir), dtype=np.float64)
    assert dose.size == ENGINE_GRID.voxel_count
