"""Stand-in for MOQUI's `tps_env` (the public build, moqui_rev v1.0.8): same command line, input
rules, files, log lines and exit codes, a numpy pencil-beam model instead of the GPU Monte Carlo.

    python -m standins.tps_env <input.in>      (real engine: tps_env <input.in>)

What it does, as the engine's source says (moqui/base/mqi_file_handler.hpp, environments/
mqi_tps_env.hpp, the gtr beam models) and as running its CPU build showed:
- Input: one `Key Value` per line, split at the first space; keys case-insensitive, the first
  of duplicate keys wins, unknown keys ignored, `#` starts a comment anywhere, integers read
  like atoi (`2.0` is 2), floats like atof, a bool is `true` or a non-zero integer; a line of
  only white space, or a key with no value, aborts.
- Folders: with UseAbsolutePath false, `ParentDir/DicomDir` and `ParentDir/logFilePath`
  (string joins, relative to the working directory); with true it aborts ("Log Dir is not
  provided"): the public build's absolute mode never sets the log folder.
- `BeamNumbers k`: the plan beam numbered k; its name (and the output's) from the k-th beam
  of IonBeamSequence; its layer CSVs from the k-th entry, sorted, of the log folder.
- Layer CSVs: every `*.csv` of that folder, sorted; the energy from the name
  (`NN_EEE.EEMeV.csv`); the whole file split at commas and read in groups of four
  (time, x, y, count): rows without a trailing comma are misread as the engine misreads them.
  A record runs int(count x ParticlesPerHistory) histories (ParticlesPerHistory defaults to
  -1); the dose is that many protons' dose, times ParticlesPerHistory, as the engine scales it.
- Geometry: the beam-aligned water phantom (beam axis x = y = 0, travelling -z into the top
  face); gantry and isocentre are not applied. TwoCentimeterMode scores the profile's plane.
- Output: `OutputDir/<BeamName>_<child>_<Scorer>.raw` (child 1 for the phantom, 2 in
  TwoCentimeterMode), float64, x fastest; OutputDir is made if its parent exists, else
  `Cannot write :<file>` and exit 0.
- Log: the engine's lines (`Total beamlets (Spots) : N`, `Total histories (Particles) : H`,
  `Uploading particles with batch..`, `Generating particles for (k of N batches) in CPU ..`,
  `Time taken by MC engine: X milli-seconds`); an error is an uncaught exception
  (`terminate called after throwing ...` / `what(): ...` on stderr, then SIGABRT: exit 134).

Stricter than the engine where it would silently compute something else, so an
orchestrator bug shows as an abort: GantryNum other than 1 or 2, a CT geometry, range
shifters and blocks, perSpot simulation, more than one beam, output formats other than raw,
a first control point with non-zero gantry, couch or collimator angle (the engine rotates
its phantom by them: zero or wrong dose), and a TwoCentimeterMode phantom too small for its
plane (the engine hangs). Faults and benchmark durations come from `standins.faults`
(`MQI_STANDIN_ENGINE_*`), keyed by the BeamNumbers value.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from config.profiles import shipped_profiles
from standins.faults import Faults, act_out
from standins.pencil_beam import COUNTS_PER_MU, Layer, compute_dose
from tasks.moqui.grid import PhantomGrid

PUBLIC = "moqui-smc-public"
SCORERS = ("EnergyDeposition", "Dose", "LETd", "LETt", "Dij", "TrackLength")
ZEROED_ANGLES = ("GantryAngle", "PatientSupportAngle", "BeamLimitingDeviceAngle")
_INT = re.compile(r"\s*[+-]?\d+")
_FLOAT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class Abort(Exception):
    """An uncaught C++ exception in the engine: `what():` on stderr, then SIGABRT."""

    def __init__(self, what: str, kind: str = "std::runtime_error") -> None:
        super().__init__(what)
        self.kind = kind


def say(line: str) -> None:
    """Print one log line at once: the orchestrator follows the log live."""
    print(line, flush=True)


def atoi(text: str) -> int:
    match = _INT.match(text)
    return int(match.group()) if match else 0


def atof(text: str) -> float:
    match = _FLOAT.match(text)
    return float(match.group()) if match else 0.0


def stoi(token: str) -> int:
    match = _INT.match(token)
    if match is None:
        raise Abort("stoi", "std::invalid_argument")
    return int(match.group())


def stof(token: str) -> float:
    match = _FLOAT.match(token)
    if match is None:
        raise Abort("stof", "std::invalid_argument")
    return float(match.group())


class EngineInput:
    """moqui_tps.in read the engine's way (mqi_file_handler.hpp read_input_parameters, get_*)."""

    def __init__(self, text: str) -> None:
        self.lines: list[str] = []
        for raw in text.split("\n"):
            if not raw:
                continue
            line = raw.strip(" \f\n\r\t\v")
            if not line:  # trim_copy of white space only: substr(npos) throws
                raise Abort("basic_string::substr: __pos > this->size()", "std::out_of_range")
            if line.startswith("#"):
                continue
            self.lines.append(line.split("#", 1)[0])

    def get(self, key: str) -> str | None:
        for line in self.lines:
            name, space, value = line.partition(" ")
            if space and name.strip().lower() == key.lower():
                value = value.strip(" \f\n\r\t\v")
                if not value:
                    raise Abort("basic_string::substr: __pos > this->size()", "std::out_of_range")
                return value
        return None

    def text(self, key: str, default: str = "") -> str:
        value = self.get(key)
        return default if value is None else value

    def integer(self, key: str, default: int) -> int:
        value = self.get(key)
        return default if value is None else atoi(value)

    def number(self, key: str, default: float) -> float:
        value = self.get(key)
        return default if value is None else atof(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        return default if value is None else (value.lower() == "true" or atoi(value) != 0)


@dataclass(frozen=True)
class Run:
    """One validated engine run, everything read from disk before any simulation starts."""

    grid: PhantomGrid
    surface_mm: float | None
    beam_number: int
    beam_name: str
    layers: list[Layer]
    histories: list[int]  # per layer
    beamlets: int
    pph: float
    output: Path
    max_batch: int


def find_rtplan(dicom_dir: str) -> Dataset:
    folder = Path(dicom_dir)
    if not folder.is_dir():
        raise Abort("There is no RTPLAN in the path. Exiting.")
    plans = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if dataset.get("Modality") == "RTPLAN":
            plans.append((path, dataset))
    if not plans:
        raise Abort("There is no RTPLAN in the path. Exiting.")
    if len(plans) > 1:
        say("There are multiple RTPLANs in the path. Selecting the first one")
    say(f"Reading DICOM directory.. : Loading RT Ion plan data from {plans[0][0]} ..")
    return plans[0][1]


def plan_beam(plan: Dataset, number: int) -> tuple[Dataset, str]:
    """The beam numbered `number`, and the name the engine gives it (the number-th of the sequence)."""
    beams = list(plan.get("IonBeamSequence", []))
    found = [item for item in beams if int(item.get("BeamNumber", -1)) == number]
    if not found:
        raise Abort("Invalid beam number.")
    if not 1 <= number <= len(beams):
        raise Abort("std::bad_alloc", "std::bad_alloc")
    beam = found[0]
    points = beam.get("IonControlPointSequence", [])
    if not points or points[0].get("SnoutPosition") is None:  # the engine dereferences it: a crash
        sys.stdout.flush()
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
    turned = {
        k: float(points[0][k].value) for k in ZEROED_ANGLES if k in points[0] and float(points[0][k].value)
    }
    if turned:
        raise Abort(
            f"stand-in: beam {number}'s first control point has {turned}: the public engine rotates its "
            "beam-aligned phantom by these angles (zero or wrong dose); give it a plan copy with them at 0"
        )
    if int(beam.get("NumberOfRangeShifters") or 0) or int(beam.get("NumberOfBlocks") or 0):
        raise Abort(
            f"stand-in: beam {number} has range shifters or blocks, which the stand-in does not model"
        )
    return beam, str(beams[number - 1].get("BeamName", "")).strip(" \f\n\r\t\v")


def layer_energy(name: str) -> float:
    """The layer's energy from its file name, the engine's way (`01_150.00MeV.csv` -> 150)."""
    stem = name[: name.find(".csv")]
    return stof(stem[stem.find("_") + 1 :])


def read_records(path: Path) -> list[tuple[float, float, int]]:
    """(x, y, count) records of one layer file: the whole file split at commas, in groups of four."""
    tokens = path.read_text(encoding="utf-8", errors="replace").split(",")
    return [
        (stof(tokens[i + 1]), stof(tokens[i + 2]), stoi(tokens[i + 3])) for i in range(0, len(tokens) - 3, 4)
    ]


def read_layers(log_dir: str, number: int, pph: float) -> tuple[list[Layer], list[int], int]:
    """The beam's layers from the number-th entry of the log folder: layers, histories, beamlets."""
    folder = Path(log_dir)
    say(f"Reading log file directory.. : Directory name --> {log_dir}")
    try:
        entries = sorted(os.path.join(log_dir, name) for name in os.listdir(folder))
    except OSError as error:
        raise Abort(
            f"filesystem error: directory iterator cannot open directory: {error.strerror} [{log_dir}]",
            "std::filesystem::__cxx11::filesystem_error",
        ) from None
    layers, histories, beamlets = [], [], 0
    if len(entries) >= number:
        field = Path(entries[number - 1])
        if not field.is_dir():
            raise Abort(
                f"filesystem error: directory iterator cannot open directory: Not a directory [{field}]",
                "std::filesystem::__cxx11::filesystem_error",
            )
        for path in sorted(p for p in field.iterdir() if p.suffix == ".csv"):
            say(f"Reading log file information in the field directory.. : {path}..")
            energy = layer_energy(path.name)
            records = read_records(path)
            counts = [int(count * pph) for _, _, count in records]  # stored as int: truncated
            spots = np.array([(x, y) for x, y, _ in records], dtype=float).reshape(-1, 2)
            layers.append(Layer(energy, spots, np.array(counts, dtype=float) / COUNTS_PER_MU))
            histories.append(sum(counts))
            beamlets += len(records)
    say(f"Reading log file information for beam {number} is complete!")
    return layers, histories, beamlets


def prepare(values: EngineInput) -> Run:
    """Check the input, read plan and logs, decide the output file; raise Abort if the engine would."""
    say(f"Reading GPU ID.. : Selected GPU ID --> {values.integer('GPUID', 0)}")
    gantry = values.integer("GantryNum", 2)
    if gantry not in (1, 2):
        raise Abort(f"stand-in: GantryNum {values.get('GantryNum')} (the engine silently takes 2)")
    say(f"Selected gantry number : {gantry}")
    out_dir = values.get("OutputDir")
    if out_dir is None:
        raise Abort("Output directory is not provided.")
    say(f"Setting output.. : Output directory name --> {out_dir}")
    if values.flag("UseAbsolutePath", False):
        if values.get("ParentDir") is None:
            raise Abort("ParentDir is not provided")
        raise Abort("Log Dir is not provided")
    parent = values.get("ParentDir")
    if parent is None:
        raise Abort("ParentDir is not provided")
    dicom_dir = parent + "/" + values.text("DicomDir")
    log_dir = parent + "/" + values.text("logFilePath")
    if not values.flag("UsingPhantomGeo", False):
        raise Abort("stand-in: UsingPhantomGeo false (a CT geometry) is not modelled")
    if values.text("SimulationType", "perBeam") != "perBeam":
        raise Abort("stand-in: only SimulationType perBeam is modelled")
    scorer = values.text("Scorer", "EnergyDeposition")
    if scorer.lower() not in (s.lower() for s in SCORERS):
        raise Abort("Unrecognized scorer name")
    if values.text("OutputFormat", "raw").lower() != "raw":
        raise Abort(f"stand-in: OutputFormat {values.get('OutputFormat')} (the stand-in writes raw only)")
    numbers = values.get("BeamNumbers")
    if numbers is None:
        raise Abort("basic_string::substr: __pos > this->size()", "std::out_of_range")
    beams = [atoi(part) for part in numbers.split(",")]
    if len(beams) != 1 or beams[0] < 1:
        raise Abort(f"stand-in: BeamNumbers {numbers}: the stand-in runs exactly one beam")
    number = beams[0]
    if Path(out_dir).is_dir() and not values.flag("OverwriteResults", False):
        raise Abort("Output directory exists.")
    say(f"Reading DICOM directory.. : DICOM directory name --> {dicom_dir}")
    plan = find_rtplan(dicom_dir)
    _, name = plan_beam(plan, number)
    say(f"Creating beam source object.. : Currently selected beam --> {number} ({name})")
    pph = values.number("ParticlesPerHistory", -1.0)
    layers, histories, beamlets = read_layers(log_dir, number, pph)
    dims = tuple(values.integer(f"PhantomDim{a}", 200) for a in "XYZ")
    units = tuple(float(values.integer(f"PhantomUnit{a}", 1)) for a in "XYZ")
    corner = tuple(float(values.integer(f"PhantomPosition{a}", 1)) for a in "XYZ")
    grid, surface, child = PhantomGrid(dims, units, corner), None, 1  # type: ignore[arg-type]
    if values.flag("TwoCentimeterMode", False):
        plane = shipped_profiles()[PUBLIC].two_centimeter_plane
        if math.prod(dims) < plane.min_phantom_voxels:
            raise Abort(
                f"stand-in: TwoCentimeterMode with a {dims} phantom: the engine sizes its scorer table from "
                f"the phantom ({math.prod(dims)} < {plane.min_phantom_voxels} voxels) and hangs"
            )
        grid = PhantomGrid(plane.dims, plane.spacing_mm, plane.position_mm)
        surface, child = plane.surface_mm, 2
    return Run(
        grid=grid,
        surface_mm=surface,
        beam_number=number,
        beam_name=name,
        layers=layers,
        histories=histories,
        beamlets=beamlets,
        pph=pph,
        output=Path(out_dir) / f"{name}_{child}_{scorer}.raw",
        max_batch=values.integer("MaxHistoriesPerBatch", 0),
    )


def write_dose(dose: np.ndarray, output: Path) -> bool:
    """Write under a temporary name, then rename; False (after `Cannot write`) if the folder cannot exist."""
    folder = output.parent
    if not folder.is_dir():
        try:
            folder.mkdir(mode=0o755)  # one level, as the engine's mkdir
        except OSError:
            say(f"Cannot write :{output}")
            return False
    partial = output.with_name(f".{output.name}.{os.getpid()}.part")
    try:
        with open(partial, "wb") as stream:
            np.ascontiguousarray(dose, dtype="<f8").tofile(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return True


def placeholder_dose(grid: PhantomGrid) -> np.ndarray:
    """Zeros with a small fixed blob at the centre: a right-sized file without the physics."""
    dose = np.zeros(grid.shape)
    centre = tuple(n // 2 for n in grid.shape)
    dose[tuple(slice(max(c - 1, 0), c + 2) for c in centre)] = 1.0
    return dose


def simulate(run: Run, faults: Faults, key: str, attempt: int, started: float) -> bool:
    """Log, compute (or act out a fault, or pace a benchmark run) and write the dose."""
    total = sum(run.histories) % 2**64  # the engine sums into a size_t: negatives wrap
    say(f"Total beamlets (Spots) : {run.beamlets}")
    say(f"Total histories (Particles) : {total}")
    signed = sum(run.histories)
    batches = 0 if signed <= 0 else (1 if run.max_batch <= 0 else math.ceil(signed / run.max_batch))
    if run.max_batch <= 0:
        say(f"Uploading particles with no batch.. : Particle count --> {total}")
    else:
        say(f"Uploading particles with batch.. : Particle count --> {run.max_batch} with {batches} batches")
    groups = np.array_split(np.arange(len(run.layers)), max(batches, 1))

    def progress(batch: int) -> None:
        say(f"Generating particles for ({batch} of {batches} batches) in CPU ..")

    fault = faults.injected_fault(key, attempt)
    if fault is not None:
        progress(1)
        act_out(
            fault,
            f"an illegal memory access was encountered (stand-in injected {fault}, launch {attempt} "
            f"of beam {key}) 700",
            "CUDA error: {}",
            255,
        )
    faults.wait_while_held(key)
    if faults.duration is not None:
        # Benchmark mode: the wall-clock time is the product, so sleeping is the point.
        for batch in range(1, batches + 1):
            time.sleep(
                max(0.0, started + faults.duration * (batch - 1) / max(batches, 1) - time.perf_counter())
            )
            progress(batch)
        written = write_dose(placeholder_dose(run.grid), run.output)
        time.sleep(max(0.0, started + faults.duration - time.perf_counter()))
        return written
    dose = np.zeros(run.grid.shape)
    if batches:
        for batch, group in enumerate(groups, start=1):
            progress(batch)
            chosen = [run.layers[i] for i in group]
            if chosen:
                dose += compute_dose(run.grid, chosen, surface_mm=run.surface_mm)
        dose *= run.pph  # the engine scales what it scored by ParticlesPerHistory
    return write_dose(dose, run.output)


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere).

    Python and numpy take most of a second to start; counting that keeps a
    benchmark's MQI_STANDIN_ENGINE_DURATION the whole run's length, as asked.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22, starttime, in clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def abort(error: Abort) -> None:
    """End as the engine does on an uncaught exception: its two lines on stderr, then SIGABRT."""
    sys.stdout.flush()
    print(f"terminate called after throwing an instance of '{error.kind}'", file=sys.stderr)
    print(f"  what():  {error}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGABRT, signal.SIG_DFL)
    os.abort()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the engine on one input file; the return value is the process exit code."""
    age = process_age()
    started = time.perf_counter() - age
    args = sys.argv[1:] if argv is None else list(argv)
    source = Path(args[0] if args else "./tps_env/moqui_tps.in").resolve()
    faults = Faults.from_env("ENGINE")
    key = "?"
    try:
        say("MOQUI SMC Treatment machine model and log-file based MC (stand-in: numpy pencil beam, no CUDA)")
        try:
            values = EngineInput(source.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            raise Abort("Cannot open input parameter file.") from None
        key = values.text("BeamNumbers", "?")
        attempt = faults.previous_launches(key) + 1
        faults.record(
            "start",
            key,
            gpu=values.integer("GPUID", 0),
            input=str(source),
            cwd=os.getcwd(),
            attempt=attempt,
            launched=time.time() - age,  # when the process started, before Python's own start-up
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),  # what a scheduler allocated
        )
        run = prepare(values)
        code = 0
        try:
            simulate(run, faults, key, attempt, started)
        except SystemExit as stop:  # an injected fault's exit
            code = stop.code if isinstance(stop.code, int) else 1
            raise
        finally:
            faults.record("end", key, exit=code)
        say(f"Time taken by MC engine: {(time.perf_counter() - started) * 1000:.1f} milli-seconds")
        return 0
    except Abort as error:
        faults.record("end", key, exit=134)
        abort(error)
        return 134  # not reached: SIGABRT ends the process


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    # Like the compiled engine, end with the last record: Python's tear-down of numpy and
    # pydicom takes a quarter of a second, during which the GPU would look still busy.
    os._exit(status)
