"""Stand-in for MOQUI's `tps_env`: same command line, same input and output files, no GPU.

    python -m standins.tps_env <input.in>      (real engine: tps_env <input.in>)

Run it in the engine's directory: relative paths in the input resolve from the
working directory, as they do for the real engine. It reads the moqui_tps.in
keys the real engine reads for a phantom, per-beam, log-driven run (GPUID is
only recorded, there is no cudaSetDevice), finds the RT Ion Plan in DicomDir
by its Modality header, the beam's per-layer delivery CSVs under
`<logFilePath>/<beam name with ':' -> '_'>/NN_EEE.EEMeV.csv`, computes the
dose with the analytic pencil-beam model of `standins.pencil_beam` (one batch
per energy layer) and writes `OUTPUT_NAME_PATTERN` in OutputDir.

Stricter than the real engine on purpose, so an orchestrator bug shows up as
an `ERROR:` line instead of a silently different run: GantryNum must be 1 or
2, UsingPhantomGeo must be true, Scorer must be Dose, and SimulationType /
SourceType, when present, must be perBeam / FluenceMap. OutputFormat raw and
npz are written; dcm, mhd and mha are refused. RandomSeed,
MaxHistoriesPerBatch and NormalizeTotalHistories do not change the result (an
analytic model has no statistical noise).

Stdout mirrors the engine's log markers, one flushed line each:
`Simulating beam B (name) with N batches`, `Generating particles for (k of N
batches)`, `Total execution time: X.XX s`; failures print a line starting
`ERROR:` and exit 1. Faults and benchmark durations come from
`standins.faults` (`MQI_STANDIN_ENGINE_*`), keyed by the BeamNumbers value.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from config.settings import OUTPUT_FORMATS
from standins.faults import Faults, act_out
from standins.pencil_beam import Layer, compute_dose
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.tps_file import TpsFormatError, read_tps

# Name of the dose file in OutputDir, e.g. "1G180:TX_2_Dose.raw". The beam name is
# the plan's BeamName verbatim (':' kept); the orchestrator's own pattern is
# configurable and must match this for the stand-in.
OUTPUT_NAME_PATTERN = "{beam_name}_{beam_number}_{scorer}.{ext}"

REQUIRED_KEYS = (
    "GPUID",
    "DicomDir",
    "logFilePath",
    "GantryNum",
    "BeamNumbers",
    "UsingPhantomGeo",
    "Scorer",
    "OutputDir",
    "OutputFormat",
)
WRITTEN_FORMATS = ("raw", "npz")  # npz holds one array named "dose", shape (nz, ny, nx)
LAYER_FILE = re.compile(r"^(\d+)_(\d+(?:\.\d+)?)MeV\.csv$")


class EngineError(Exception):
    """Bad input: reported as an `ERROR:` line and exit code 1, like the real engine."""


def say(line: str) -> None:
    """Print one log line at once: the orchestrator follows the log live."""
    print(line, flush=True)


@dataclass(frozen=True)
class Beam:
    number: int
    name: str
    gantry_angle_deg: float
    isocentre_mm: tuple[float, float, float]


def _flag(values: Mapping[str, str], key: str, default: bool) -> bool:
    text = values.get(key)
    if text is None:
        return default
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise EngineError(f"{key} must be true or false, not {text!r}")


def _gpu_id(text: str | None) -> int | str | None:
    """GPUID for the launch record: the integer when it is one, else the text as given."""
    try:
        return int(text) if text is not None else None
    except ValueError:
        return text


def _integer(values: Mapping[str, str], key: str) -> int:
    try:
        return int(values[key])
    except ValueError:
        raise EngineError(f"{key} must be an integer, not {values[key]!r}") from None


def find_rtplan(dicom_dir: Path) -> pydicom.Dataset:
    """The one RT Ion Plan in `dicom_dir`, recognised by its Modality header, not its file name."""
    if not dicom_dir.is_dir():
        raise EngineError(f"DicomDir not found: {dicom_dir}")
    plans = []
    for path in sorted(p for p in dicom_dir.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if dataset.get("Modality") == "RTPLAN":
            plans.append((path, dataset))
    if not plans:
        raise EngineError(f"no RTPLAN DICOM file in DicomDir {dicom_dir}")
    if len(plans) > 1:
        names = ", ".join(path.name for path, _ in plans)
        raise EngineError(f"several RTPLAN files in DicomDir {dicom_dir}: {names}")
    return plans[0][1]


def plan_beam(plan: pydicom.Dataset, number: int) -> Beam:
    """Name, gantry angle and isocentre of beam `number` from the plan's first control point."""
    for item in plan.get("IonBeamSequence", []):
        if int(item.get("BeamNumber", -1)) != number:
            continue
        name = item.get("BeamName")
        points = item.get("IonControlPointSequence", [])
        if not name or not points or points[0].get("GantryAngle") is None:
            raise EngineError(f"beam {number} in the plan lacks BeamName or a first GantryAngle")
        isocentre = next((p.IsocenterPosition for p in points if "IsocenterPosition" in p), [])
        if len(isocentre) != 3:
            raise EngineError(f"beam {number} in the plan has no IsocenterPosition (x, y, z)")
        x, y, z = (float(c) for c in isocentre)
        return Beam(number, str(name), float(points[0].GantryAngle), (x, y, z))
    raise EngineError(f"BeamNumbers {number}: no such beam in the plan's IonBeamSequence")


def read_layers(log_dir: Path, beam: Beam) -> list[Layer]:
    """The beam's energy layers from `NN_EEE.EEMeV.csv` files (rows time_ms,x_mm,y_mm,MU), by NN."""
    folder = log_dir / beam.name.replace(":", "_")
    if not folder.is_dir():
        raise EngineError(f"log folder for beam {beam.number} ({beam.name}) not found: {folder}")
    found = []
    for path in folder.iterdir():
        match = LAYER_FILE.match(path.name)
        if match is None:
            continue
        text = path.read_text(encoding="utf-8")
        if text.strip():
            try:
                rows = np.loadtxt(text.splitlines(), delimiter=",", ndmin=2)
            except ValueError as bad:
                raise EngineError(f"unreadable log file {path}: {bad}") from None
            if rows.shape[1] != 4:
                raise EngineError(f"log file {path} has {rows.shape[1]} columns, expected 4")
        else:
            rows = np.zeros((0, 4))
        found.append((int(match[1]), Layer(float(match[2]), rows[:, 1:3], rows[:, 3])))
    if not found:
        raise EngineError(f"no NN_EEE.EEMeV.csv layer files in {folder}")
    return [layer for _, layer in sorted(found, key=lambda pair: pair[0])]


@dataclass(frozen=True)
class Run:
    """One validated engine run, everything read from disk before any simulation starts."""

    grid: PhantomGrid
    beam: Beam
    layers: list[Layer]
    output: Path
    output_format: str


def prepare(values: Mapping[str, str], source: str) -> Run:
    """Check the input, read plan and logs, and decide the output file; raise EngineError if bad."""
    missing = [key for key in REQUIRED_KEYS if key not in values]
    if missing:
        raise EngineError(f"{source}: missing required key(s): {', '.join(missing)}")
    try:
        grid = PhantomGrid.from_tps(values, source)
    except TpsFormatError as bad:
        raise EngineError(str(bad)) from None
    _integer(values, "GPUID")  # only recorded, but a real engine would fail on a bad one
    if _integer(values, "GantryNum") not in (1, 2):
        raise EngineError(f"GantryNum must be 1 or 2, not {values['GantryNum']}")
    if not _flag(values, "UsingPhantomGeo", default=False):
        raise EngineError("UsingPhantomGeo false (CT geometry) is not supported by the stand-in")
    if _flag(values, "ScoreToCTGrid", default=False):
        raise EngineError("ScoreToCTGrid true is not supported by the stand-in")
    for key, supported in (("SimulationType", "perBeam"), ("SourceType", "FluenceMap"), ("Scorer", "Dose")):
        if values.get(key, supported) != supported:
            raise EngineError(f"{key} {values[key]} is not supported by the stand-in ({supported})")
    output_format = values["OutputFormat"]
    if output_format not in OUTPUT_FORMATS:
        raise EngineError(f"unknown OutputFormat {output_format!r}")
    if output_format not in WRITTEN_FORMATS:
        raise EngineError(
            f"OutputFormat {output_format} is not supported by the stand-in "
            f"(use {' or '.join(WRITTEN_FORMATS)})"
        )
    beam = plan_beam(find_rtplan(Path(values["DicomDir"])), _integer(values, "BeamNumbers"))
    layers = read_layers(Path(values["logFilePath"]), beam)
    name = OUTPUT_NAME_PATTERN.format(
        beam_name=beam.name, beam_number=beam.number, scorer=values["Scorer"], ext=output_format
    )
    output = Path(values["OutputDir"]) / name
    if output.exists() and not _flag(values, "OverwriteResults", default=False):
        raise EngineError(f"output file exists and OverwriteResults is false: {output}")
    return Run(grid, beam, layers, output, output_format)


def write_dose(dose: np.ndarray, output: Path, output_format: str) -> None:
    """Write under a temporary name in the same folder, then rename: never a partial final file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.part")
    try:
        with open(partial, "wb") as stream:
            if output_format == "raw":
                np.ascontiguousarray(dose, dtype=np.float64).tofile(stream)
            else:
                np.savez(stream, dose=dose)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)


def placeholder_dose(grid: PhantomGrid) -> np.ndarray:
    """Zeros with a small fixed blob at the centre: a right-sized file without the physics."""
    dose = np.zeros(grid.shape)
    centre = tuple(n // 2 for n in grid.shape)
    dose[tuple(slice(max(c - 1, 0), c + 2) for c in centre)] = 1.0
    return dose


def simulate(run: Run, faults: Faults, key: str, attempt: int, started: float) -> None:
    """Log, compute (or act out a fault, or pace a benchmark run) and write the dose."""
    batches = len(run.layers)

    def progress(batch: int) -> None:
        say(f"Generating particles for ({batch} of {batches} batches)")

    say(f"Simulating beam {run.beam.number} ({run.beam.name}) with {batches} batches")
    fault = faults.injected_fault(key, attempt)
    if fault is not None:
        progress(1)
        act_out(
            fault,
            f"CUDA error: an illegal memory access was encountered "
            f"(stand-in injected {fault}, launch {attempt} of beam {key})",
        )
    if faults.duration is not None:
        # Benchmark mode: the wall-clock time is the product, so sleeping is the point.
        dose = placeholder_dose(run.grid)
        for batch in range(1, batches + 1):
            time.sleep(max(0.0, started + faults.duration * (batch - 1) / batches - time.perf_counter()))
            progress(batch)
        write_dose(dose, run.output, run.output_format)
        time.sleep(max(0.0, started + faults.duration - time.perf_counter()))
    else:
        dose = compute_dose(
            run.grid, run.beam.isocentre_mm, run.beam.gantry_angle_deg, run.layers, on_layer=progress
        )
        write_dose(dose, run.output, run.output_format)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the engine on one input file; the return value is the process exit code."""
    age = process_age()
    started = time.perf_counter() - age
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        say("ERROR: usage: python -m standins.tps_env <input.in>")
        return 1
    source = Path(args[0]).resolve()
    try:
        values = read_tps(source)
    except (OSError, TpsFormatError, UnicodeDecodeError) as bad:
        say(f"ERROR: cannot read input file {source}: {bad}")
        return 1
    key = values.get("BeamNumbers")
    if key is None:
        say(f"ERROR: {source}: missing required key(s): BeamNumbers")
        return 1
    faults = Faults.from_env("ENGINE")
    attempt = faults.previous_launches(key) + 1
    faults.record(
        "start",
        key,
        gpu=_gpu_id(values.get("GPUID")),
        input=str(source),
        cwd=os.getcwd(),
        attempt=attempt,
        launched=time.time() - age,  # when the process started, before Python's own start-up
    )
    code = 1
    try:
        say(
            f"MOQUI stand-in tps_env (numpy pencil beam, no CUDA): GPUID {values.get('GPUID')}, "
            f"RandomSeed {values.get('RandomSeed', '0')}, input {source}"
        )
        run = prepare(values, str(source))
        simulate(run, faults, key, attempt, started)
        say(f"Total execution time: {time.perf_counter() - started:.2f} s")
        code = 0
    except EngineError as bad:
        say(f"ERROR: {bad}")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        raise
    finally:
        faults.record("end", key, exit=code)
    return code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    # Like the compiled engine, end with the last record: Python's tear-down of numpy and
    # friends takes tenths of a second on a busy host, and the GPU stays locked meanwhile.
    os._exit(status)
