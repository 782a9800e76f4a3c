"""Stand-in for mqi_interpreter: turns a case folder into per-layer spot CSVs.

Same command line and output layout as the real tool, so the orchestrator
cannot tell them apart:

    python -m standins.interpreter --logdir <case dir> --outputdir <out>

writes `<out>/plan/<the RTPLAN>` and `<out>/log/<beam name, ':' -> '_'>/NN_EEE.EEMeV.csv`
with rows `time_ms,x_mm,y_mm,MU` and no header. The spots come from the plan, not from
the machine logs, so a line-scanning plan (which has no spots) is refused with a clear
error. Faults are injected through `standins.faults` (tool INTERPRETER, key = case id).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from pydicom.dataset import Dataset

from standins.faults import Faults, act_out
from tasks.casefolder.names import csv_dir_name
from tasks.casefolder.plan import energy_layers, find_rtplans, fraction_metersets, setup_reason

# Plausible delivery timing for the synthetic rows: a spot's dwell grows with its MU.
MOVE_MS = 2.0
DWELL_MS_PER_MU = 5.0


class InterpreterError(Exception):
    """The case cannot be interpreted; the message goes to stderr."""


def layer_csv_name(index: int, energy: float) -> str:
    """`01_150.00MeV.csv`: 1-based layer index and nominal energy, as the real tool names them."""
    return f"{index:02d}_{energy:06.2f}MeV.csv"


def _find_plan(logdir: Path) -> tuple[Path, Dataset]:
    plans, unreadable = find_rtplans(logdir)
    if len(plans) != 1:
        found = ", ".join(str(path) for path, _ in plans) or "none"
        details = "".join(f"; unreadable {path}: {reason}" for path, reason in unreadable)
        raise InterpreterError(f"expected exactly one RTPLAN under {logdir}, found {found}{details}")
    return plans[0]


def _floats(value: object) -> list[float]:
    """A DICOM multi-value as floats; pydicom returns a single value bare (one spot)."""
    return [float(v) for v in value] if isinstance(value, Iterable) else [float(value)]


def _layer_rows(layer_points: tuple[Dataset, ...], mu_per_weight: float, label: str) -> list[str]:
    """CSV rows for one energy layer: every spot with a positive weight, in plan order."""
    rows = []
    clock = 0.0
    for point in layer_points:
        if "ScanSpotMetersetWeights" not in point:
            continue
        weights = _floats(point.ScanSpotMetersetWeights)
        positions = _floats(point.get("ScanSpotPositionMap", []))
        if len(positions) != 2 * len(weights):
            raise InterpreterError(f"{label}: ScanSpotPositionMap does not match ScanSpotMetersetWeights")
        for spot, weight in enumerate(weights):
            if weight <= 0:
                continue
            mu = weight * mu_per_weight
            clock += MOVE_MS + DWELL_MS_PER_MU * mu
            x, y = positions[2 * spot], positions[2 * spot + 1]
            rows.append(f"{clock:.3f},{x:.3f},{y:.3f},{mu:.6f}")
    return rows


def _beam_tables(plan: Dataset) -> dict[str, dict[str, list[str]]]:
    """{beam folder: {csv name: rows}} for every treatment beam; refuses line scanning."""
    metersets = fraction_metersets(plan)
    tables: dict[str, dict[str, list[str]]] = {}
    for ion_beam in plan.get("IonBeamSequence", []):
        number = int(ion_beam.BeamNumber)
        name = str(ion_beam.BeamName)
        label = f"beam {number} {name!r}"
        if setup_reason(ion_beam, metersets.get(number)) is not None:
            print(f"skipping {label}: not a treatment field", flush=True)
            continue
        scan_mode = str(ion_beam.get("ScanMode", ""))
        if scan_mode != "MODULATED":
            raise InterpreterError(
                f"{label} has ScanMode {scan_mode or 'missing'}: this stand-in reads spots from "
                "the plan and cannot interpret line scanning (its spots come from the machine "
                "logs); use the real mqi_interpreter"
            )
        final_weight = float(ion_beam.FinalCumulativeMetersetWeight)
        mu_per_weight = metersets[number] / final_weight
        layers = energy_layers(ion_beam)
        tables[csv_dir_name(name)] = {
            layer_csv_name(index, layer.energy): _layer_rows(
                layer.control_points, mu_per_weight, f"{label} layer {index}"
            )
            for index, layer in enumerate(layers, start=1)
        }
        print(f"{label}: {len(layers)} layers, {metersets[number]:.3f} MU", flush=True)
    if not tables:
        raise InterpreterError("the plan has no treatment beams")
    return tables


def interpret(logdir: Path, outputdir: Path) -> None:
    """Write the plan copy and the per-layer CSVs; nothing is written if any beam is refused."""
    plan_path, plan = _find_plan(logdir)
    print(f"plan: {plan_path}", flush=True)
    tables = _beam_tables(plan)
    (outputdir / "plan").mkdir(parents=True, exist_ok=True)
    shutil.copy2(plan_path, outputdir / "plan" / plan_path.name)
    for folder, files in tables.items():
        beam_dir = outputdir / "log" / folder
        beam_dir.mkdir(parents=True, exist_ok=True)
        for name, rows in files.items():
            (beam_dir / name).write_text("".join(row + "\n" for row in rows))
        print(f"wrote {len(files)} layer files to {beam_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run as the real tool runs: exit 0 on success, 1 on failure, 2 for bad arguments."""
    parser = argparse.ArgumentParser(
        prog="mqi_interpreter (stand-in)", description="Write per-layer spot CSVs for a case folder."
    )
    parser.add_argument("--logdir", required=True, type=Path, help="the case folder")
    parser.add_argument("--outputdir", required=True, type=Path, help="where plan/ and log/ go")
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        parser.error(f"--logdir {args.logdir} is not a folder")

    key = Path(os.path.abspath(args.logdir)).name
    faults = Faults.from_env("INTERPRETER")
    attempt = faults.previous_launches(key) + 1
    faults.record("start", key, attempt=attempt)
    started = time.monotonic()
    fault = faults.injected_fault(key, attempt)
    code = 1  # what the end record says if a fault or an error ends the run
    try:
        if fault is None:
            try:
                interpret(args.logdir, args.outputdir)
                code = 0
            except (InterpreterError, OSError, ValueError, AttributeError) as error:
                print(f"mqi_interpreter stand-in: error: case {key}: {error}", file=sys.stderr)
        if faults.duration is not None:
            time.sleep(max(0.0, started + faults.duration - time.monotonic()))
        if fault is not None:
            act_out(fault, f"injected {fault} for case {key} (attempt {attempt})")
    finally:
        faults.record("end", key, exit=code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
