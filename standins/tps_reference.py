"""A stand-in planning system's QA doses: one TPS RTDOSE (BEAM) per treatment beam of a case's plan.

The clinic's TPS exports, for each field of a verification plan, its dose in a water phantom;
QA compares the recalculated dose with it. This stand-in computes that dose from the plan
itself (planned spots and MU, not the delivery logs) with the stand-in engine's pencil-beam
model, on a grid of its own (coarser, its origin shifted: a TPS dose grid is never the
engine's), and writes it as an RTDOSE that references the plan's SOP instance and the beam
number, in a frame of reference of its own. A LINE-scanning plan carries no spots: its
beams get no reference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from standins.pencil_beam import Layer, compute_dose
from tasks.casefolder.plan import energy_layers, fraction_metersets
from tasks.dose.model import DoseFrame
from tasks.dose.write import raw_to_rtdose
from tasks.moqui.grid import PhantomGrid

TPS_SPACING_FACTOR = 1.5  # the TPS grid's spacing, in units of the recalculated grid's


def tps_grid(grid: PhantomGrid) -> PhantomGrid:
    """A TPS dose grid over the same region: 1.5x the spacing, the corner moved by a third of a voxel.

    A single plane (2 cm mode) stays one plane at the same depth.
    """
    dims, spacing, corner = [], [], []
    for axis, (n, unit, position) in enumerate(zip(grid.dims, grid.spacing, grid.position, strict=True)):
        if axis == 2 and n == 1:
            dims.append(1)
            spacing.append(unit)
            corner.append(position)
            continue
        step = unit * TPS_SPACING_FACTOR
        dims.append(int((n * unit - unit / 3) // step))
        spacing.append(step)
        corner.append(position + unit / 3)
    return PhantomGrid(tuple(dims), tuple(spacing), tuple(corner))  # type: ignore[arg-type]


def planned_layers(ion_beam: pydicom.Dataset, meterset: float) -> list[Layer]:
    """The beam's layers as planned: spot positions and MU (meterset weight x MU per unit weight)."""
    layers = energy_layers(ion_beam)
    final = float(ion_beam.FinalCumulativeMetersetWeight)
    result = []
    for layer in layers:
        spots, mu = [], []
        for point in layer.control_points:
            weights = point.get("ScanSpotMetersetWeights")
            positions = point.get("ScanSpotPositionMap")
            if weights is None or positions is None:
                continue
            weights = np.atleast_1d(np.asarray(weights, dtype=float))
            spots.append(np.asarray(positions, dtype=float).reshape(-1, 2))
            mu.append(weights * meterset / final)
        if spots:
            result.append(Layer(layer.energy, np.concatenate(spots), np.concatenate(mu)))
    return result


def write_tps_references(
    case_dir: Path,
    grid: PhantomGrid,
    *,
    surface_mm: float | None = None,
    out_dir: Path | None = None,
    dose_type: str = "PHYSICAL",
    rbe: float = 1.1,
) -> list[Path]:
    """Write `RD.<field>.dcm` (the beam name up to ':') per spot-scanned treatment beam; return them.

    `grid` and `surface_mm` are the recalculation's (its phantom, or the 2 cm plane and its
    surface); an EFFECTIVE dose is the physical one times `rbe`.
    """
    case_dir = Path(case_dir)
    plan_path = next(p for p in sorted(case_dir.glob("*.dcm")) if pydicom.dcmread(p).Modality == "RTPLAN")
    plan = pydicom.dcmread(plan_path)
    metersets = fraction_metersets(plan)
    reference_grid = tps_grid(grid)
    frame = DoseFrame(
        generate_uid(entropy_srcs=[plan.SOPInstanceUID, "stand-in TPS water phantom"]),
        "stand-in TPS: planned dose of one field in a water phantom, beam along -z",
        "TPS phantom",
    )
    target = Path(out_dir or case_dir)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for beam in plan.IonBeamSequence:
        number = int(beam.BeamNumber)
        if beam.get("TreatmentDeliveryType") != "TREATMENT" or number not in metersets:
            continue
        layers = planned_layers(beam, metersets[number])
        if not layers:
            continue
        dose = compute_dose(reference_grid, layers, surface_mm=surface_mm)
        if dose_type == "EFFECTIVE":
            dose = dose * rbe
        out = target / f"RD.{str(beam.BeamName).split(':', 1)[0]}.dcm"
        with tempfile.TemporaryDirectory() as scratch:
            raw = Path(scratch) / "dose.raw"
            np.ascontiguousarray(dose, dtype="<f8").tofile(raw)
            raw_to_rtdose(
                [raw],
                reference_grid,
                plan_path,
                out,
                summation="BEAM",
                frame=frame,
                beam_number=number,
                dose_type=dose_type,
            )
        written.append(out)
    return written
