"""Stand-in for mqi_interpreter: turns a case folder's machine logs into per-layer spot CSVs.

Same command line, output layout, rules and exit codes as the clinic's tool, read from its
source (main_cli.py, parsers/, config_loader.py, moqui_generator.py), so the orchestrator
cannot tell them apart:

    python -m standins.interpreter --logdir <case dir> --outputdir <out>

- The plan: the first `*.dcm` found anywhere under --logdir (sorted) whose name holds
  RTPLAN, else the first one; it must be an RTPLAN whose beams name G1 or G2 (the room's
  calibration, standins/machine_logs.py). Every control point of every beam needs
  NominalBeamEnergy and CumulativeMetersetWeight. Setup fields are the beams named SETUP or
  described as "Site Setup"; the others are treated, layer by layer (runs of equal energy).
- Every folder of --logdir named by digits needs a PlanInfo.txt (patient, beam number and
  stop layer checked against the plan) and gives its PlanRange monitor range codes.
- Every `*.ptn` below --logdir, in sorted path order, is one layer, handed out to the
  treated beams' layers in plan order; one CSV row per record: time = index x time gain,
  x and y from the raw positions, MU = round(Dose1 x the range factor).
- Writes `<out>/plan/<plan file>` and `<out>/log/<beam name, other than [A-Za-z0-9_-] -> _>/
  NN_EEE.EEMeV.csv`, rows `time_ms,x_mm,y_mm,MU` (csv module: CRLF, no trailing comma).
- Errors: one `Error: ...` line on stderr and exit 1 (2 for bad arguments), as the real one.
  Like the real one it maps logs to layers by order alone: the orchestrator stages its input.

Faults are injected through `standins.faults` (tool INTERPRETER, key = the --logdir folder's name).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from standins.faults import Faults, act_out
from standins.machine_logs import (
    CALIBRATIONS,
    DOSE1,
    RANGE_FACTORS,
    RAW_X,
    RAW_Y,
    decode,
    room_of,
)


class InterpreterError(Exception):
    """What the real tool reports as `Error: ...` with exit code 1."""


def sanitised(name: str) -> str:
    """The output folder of a beam: every character but [A-Za-z0-9_-] becomes '_'."""
    return re.sub(r"[^a-zA-Z0-9_\-]", "_", name)


def layer_csv_name(index: int, energy: float) -> str:
    """`01_150.00MeV.csv`: 1-based layer index and nominal energy, as the real tool names them."""
    return f"{index:02d}_{energy:.2f}MeV.csv"


def is_setup(beam: Dataset) -> bool:
    return str(beam.get("BeamName", "")) == "SETUP" or str(beam.get("BeamDescription", "")) == "Site Setup"


@dataclass(frozen=True)
class TreatedBeam:
    number: int
    name: str
    energies: list[float]  # per layer


def find_plan(logdir: Path) -> tuple[Path, Dataset]:
    found = sorted(logdir.rglob("*.dcm"))
    if not found:
        raise FileNotFoundError(f"No .dcm file found in {logdir} directory")
    path = next((p for p in found if "rtplan" in p.name.lower()), found[0])
    plan = pydicom.dcmread(path)
    if plan.get("Modality") != "RTPLAN":
        raise InterpreterError(f"Error: DICOM file is not an RTPLAN. Modality is {plan.get('Modality')!r}.")
    return path, plan


def treated_beams(plan: Dataset) -> list[TreatedBeam]:
    beams = []
    for item in plan.get("IonBeamSequence", []):
        name = str(item.get("BeamName", ""))
        energies: list[float] = []
        for point in item.get("IonControlPointSequence", []):
            energy, weight = point.get("NominalBeamEnergy"), point.get("CumulativeMetersetWeight")
            if energy is None or weight is None:
                raise InterpreterError(
                    f"Error: Missing NominalBeamEnergy or CumulativeMetersetWeight in a control point "
                    f"for beam '{name}'."
                )
            if not energies or energies[-1] != float(energy):
                energies.append(float(energy))
        if not is_setup(item):
            beams.append(TreatedBeam(int(item.BeamNumber), name, energies))
    return beams


def machine_room(plan: Dataset) -> str:
    machines = " ".join(str(item.get("TreatmentMachineName", "")) for item in plan.get("IonBeamSequence", []))
    if "G1" in machines and "G2" in machines:
        raise InterpreterError("Error: RT Plan contains both G1 and G2 treatment machines")
    room = room_of(machines)
    if room is None:
        raise InterpreterError("Error: No G1 or G2 found in TreatmentMachineName")
    return room


def _planinfo(folder: Path) -> dict[str, str]:
    path = folder / "PlanInfo.txt"
    if not path.is_file():
        raise FileNotFoundError(f"Error: PlanInfo.txt not found in {folder.name}")
    values = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            key, comma, value = line.partition(",")
            if not comma:
                raise InterpreterError(f"Error: Invalid line in {path}: {line!r}")
            values[key.strip()] = value.strip()
    return values


def range_codes(logdir: Path, plan: Dataset, beams: list[TreatedBeam]) -> list[int]:
    """Every digit folder's PlanInfo checked and its PlanRange codes, in sorted folder order."""
    layers = {beam.number: len(beam.energies) for beam in beams}
    codes: list[int] = []
    for folder in sorted(p for p in logdir.iterdir() if p.is_dir() and p.name.isdigit()):
        info = _planinfo(folder)
        if info.get("DICOM_PATIENT_ID") != str(plan.PatientID):
            raise InterpreterError(
                f"PlanInfo validation failed in {folder.name}: DICOM_PATIENT_ID "
                f"{info.get('DICOM_PATIENT_ID')} does not match RTPLAN PatientID {plan.PatientID}."
            )
        number = int(info.get("DICOM_BEAM_NUMBER", "-1"))
        if number not in layers:
            raise InterpreterError(
                f"PlanInfo validation failed in {folder.name}: no beam {number} in the plan."
            )
        if not 1 <= int(info.get("STOP_LAYER_NUMBER", "0")) <= layers[number]:
            raise InterpreterError(
                f"PlanInfo validation failed in {folder.name}: STOP_LAYER_NUMBER out of range."
            )
        ranges = folder / "PlanRange.csv" if (folder / "PlanRange.csv").exists() else folder / "PlanRange.txt"
        for line in ranges.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            if line.strip():
                fields = line.split(",")
                if len(fields) < 6:
                    raise InterpreterError(f"Error: Invalid line format in {ranges}: {line!r}")
                codes.append(int(fields[5]))
    return codes


def layer_rows(path: Path, room: str, code: int) -> list[list[object]]:
    """The CSV rows of one PTN file: time, x, y as float32 values, MU as an integer."""
    try:
        records = decode(path.read_bytes())
    except ValueError as bad:
        raise InterpreterError(f"Error: {bad}. Cannot reshape.") from None
    calibration = CALIBRATIONS[room]
    factor = RANGE_FACTORS.get(code)
    if factor is None:
        print(f"Warning: Unrecognized monitor_range_code {code}. Defaulting factor to 1.0.", flush=True)
        factor = 1.0
    x, y = calibration.position(records[:, RAW_X], records[:, RAW_Y])
    times = np.arange(len(records), dtype=np.float32) * calibration.time_gain_ms
    mu = np.round(records[:, DOSE1] * factor).astype(int)
    # beam-off samples are written too, with their (zero) counts
    return [[str(t), str(a), str(b), int(m)] for t, a, b, m in zip(times, x, y, mu, strict=True)]


def interpret(logdir: Path, outputdir: Path) -> None:
    plan_path, plan = find_plan(logdir)
    print(f"Found RTPLAN: {plan_path}", flush=True)
    room = machine_room(plan)
    print(f"Selected config file: scv_init_{room}.txt", flush=True)
    beams = treated_beams(plan)
    ptns = sorted(logdir.glob("**/*.ptn"))
    print(f"Found {len(ptns)} .ptn files.", flush=True)
    codes = range_codes(logdir, plan, beams)
    print("PlanInfo.txt files validated successfully.", flush=True)
    print(f"Total dose monitor ranges loaded: {len(codes)}", flush=True)
    (outputdir / "plan").mkdir(parents=True, exist_ok=True)
    shutil.copy2(plan_path, outputdir / "plan" / plan_path.name)
    index = 0
    for beam in beams:
        folder = outputdir / "log" / sanitised(beam.name)
        folder.mkdir(parents=True, exist_ok=True)
        for layer, energy in enumerate(beam.energies, start=1):
            if index >= len(ptns):
                print(
                    f"Warning: Not enough PTN data entries for beam '{beam.name}' layer {layer}.", flush=True
                )
                break
            code = codes[index] if index < len(codes) else 0
            with (folder / layer_csv_name(layer, energy)).open("w", newline="") as out:
                csv.writer(out).writerows(layer_rows(ptns[index], room, code))
            index += 1
        print(f"beam '{beam.name}': {len(beam.energies)} layers written to {folder}", flush=True)
    print("--- MQI Data Processing Completed Successfully ---", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run as the real tool runs: exit 0 on success, 1 on failure, 2 for bad arguments."""
    parser = argparse.ArgumentParser(
        prog="main_cli.py (stand-in)", description="Write per-layer spot CSVs from a case's machine logs."
    )
    parser.add_argument("--logdir", required=True, type=Path, help="the case folder")
    parser.add_argument("--outputdir", required=True, type=Path, help="where plan/ and log/ go")
    args = parser.parse_args(argv)
    key = Path(os.path.abspath(args.logdir)).name
    faults = Faults.from_env("INTERPRETER")
    attempt = faults.previous_launches(key) + 1
    faults.record("start", key, attempt=attempt)
    started = time.monotonic()
    fault = faults.injected_fault(key, attempt)
    code = 1  # what the end record says if a fault or an error ends the run
    try:
        print("--- MQI Data Processing Started ---", flush=True)
        faults.wait_while_held(key)
        if fault is None:
            try:
                interpret(args.logdir, args.outputdir)
                code = 0
            except InterpreterError as error:
                print(f"Error: Invalid data or configuration. {error}", file=sys.stderr, flush=True)
            except FileNotFoundError as error:
                print(f"Error: A required file was not found. {error}", file=sys.stderr, flush=True)
        if faults.duration is not None:
            time.sleep(max(0.0, started + faults.duration - time.monotonic()))
        if fault is not None:
            act_out(fault, f"injected {fault} for case {key} (attempt {attempt})", "Error: {}", 1, sys.stderr)
    finally:
        faults.record("end", key, exit=code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
