"""Doses to compare, on grids placed by their DICOM geometry (never by array index), in Gy.

Both doses are read into one frame: the engine's beam-aligned water phantom (mm; beam
along -z, depth = water surface - z). A TPS dose is taken in its own DICOM coordinates,
which for a phantom QA dose are the phantom's; one in the patient's frame (the plan's
FrameOfReferenceUID) cannot be compared and is refused. An OCTAVIUS measurement is a plane
at the configured depth, its crossplane axis along x and its inplane axis along y.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from tasks.dose.geometry import DoseGeometry
from tasks.dose.model import RtDoseError
from tasks.qa.model import QaInputError

_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_TOL_MM = 1e-3
PLANE_TOLERANCE_MM = 1.0  # two planes this close in depth are the same plane
_UNIT_GY = {"GY": 1.0, "CGY": 0.01, "MGY": 0.001}


@dataclass(frozen=True)
class DoseGrid:
    """A dose (Gy) on a rectilinear grid: axes ascending, in mm; shape (len(z), len(y), len(x))."""

    path: str
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    dose: np.ndarray  # NaN where nothing was measured
    frame_uid: str | None = None

    @property
    def is_plane(self) -> bool:
        return self.z.size == 1

    def plane(self, z_mm: float, other: str) -> DoseGrid:
        """This dose in the plane z = z_mm (linear between slices); outside the grid: an error."""
        if self.is_plane:
            if abs(float(self.z[0]) - z_mm) > PLANE_TOLERANCE_MM:
                raise QaInputError(
                    f"{self.path} is the plane z = {float(self.z[0]):g} mm, {other} the plane "
                    f"z = {z_mm:g} mm: not the same plane (frame mismatch)"
                )
            return self
        if not (self.z[0] - _TOL_MM <= z_mm <= self.z[-1] + _TOL_MM):
            raise QaInputError(
                f"{other} is the plane z = {z_mm:g} mm, outside {self.path} "
                f"(z {float(self.z[0]):g} to {float(self.z[-1]):g} mm): size mismatch"
            )
        upper = int(np.clip(np.searchsorted(self.z, z_mm), 1, self.z.size - 1))
        z0, z1 = float(self.z[upper - 1]), float(self.z[upper])
        weight = (z_mm - z0) / (z1 - z0)
        dose = (1 - weight) * self.dose[upper - 1] + weight * self.dose[upper]
        return DoseGrid(self.path, np.array([z_mm]), self.y, self.x, dose[None], self.frame_uid)


def _ascending(axis: np.ndarray, dose: np.ndarray, dim: int, path: str, name: str) -> tuple:
    if axis.size > 1 and np.all(np.diff(axis) < 0):
        return axis[::-1], np.flip(dose, axis=dim)
    if axis.size > 1 and not np.all(np.diff(axis) > 0):
        raise QaInputError(f"{path}: its {name} coordinates are not strictly monotonic")
    return axis, dose


def read_rtdose_grid(path: str, *, rbe: float, patient_frame_uid: str | None = None) -> DoseGrid:
    """An RTDOSE as physical dose in Gy on its grid (EFFECTIVE doses divided by `rbe`)."""
    try:
        ds = pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as bad:
        raise QaInputError(f"{path}: cannot read as DICOM: {bad}") from None
    if ds.get("Modality") != "RTDOSE":
        raise QaInputError(f"{path}: not an RTDOSE (Modality {ds.get('Modality')!r})")
    units = str(ds.get("DoseUnits", "")).upper()
    if units != "GY":
        raise QaInputError(f"{path}: DoseUnits {units or 'missing'}: only absolute dose (GY) can be compared")
    dose_type = str(ds.get("DoseType", "")).upper()
    factor = {"PHYSICAL": 1.0, "EFFECTIVE": 1.0 / rbe}.get(dose_type)
    if factor is None:
        raise QaInputError(f"{path}: DoseType {dose_type or 'missing'}: only PHYSICAL or EFFECTIVE doses")
    frame = str(ds.get("FrameOfReferenceUID", "")) or None
    if patient_frame_uid and frame == patient_frame_uid:
        raise QaInputError(
            f"{path}: in the patient's frame of reference (the plan's {frame}), not a phantom: a patient "
            "dose cannot be compared with the water-phantom recalculation (frame mismatch)"
        )
    try:
        geometry = DoseGeometry.from_dataset(ds, path)  # type: ignore[arg-type]
        pixels = ds.pixel_array.reshape(geometry.shape).astype(float)
    except (RtDoseError, ValueError, AttributeError) as bad:
        raise QaInputError(f"{path}: cannot read its dose grid: {bad}") from None
    if any(abs(a - b) > _TOL_MM for a, b in zip(geometry.orientation, _AXIAL, strict=False)):
        raise QaInputError(
            f"{path}: ImageOrientationPatient {list(geometry.orientation)} is not axis-aligned "
            "(1,0,0,0,1,0): frame mismatch"
        )
    dose = pixels * float(ds.DoseGridScaling) * factor
    x0, y0, z0 = geometry.position
    x = x0 + np.arange(geometry.columns) * geometry.pixel_spacing[1]
    y = y0 + np.arange(geometry.rows) * geometry.pixel_spacing[0]
    z = z0 + np.asarray(geometry.frame_offsets[: geometry.frames] or (0.0,), dtype=float)
    z, dose = _ascending(z, dose, 0, path, "z")
    y, dose = _ascending(y, dose, 1, path, "y")
    x, dose = _ascending(x, dose, 2, path, "x")
    return DoseGrid(path, z, y, x, np.ascontiguousarray(dose), frame)


def read_mcc(path: str, z_mm: float) -> DoseGrid:
    """An OCTAVIUS array measurement (PTW CC-Export .mcc) as a plane at z = z_mm, NaN between detectors.

    Each BEGIN_SCAN block is one detector row at SCAN_OFFAXIS_INPLANE (mm, y); each line between
    BEGIN_DATA and END_DATA is a crossplane position (mm, x), the dose, and an optional detector tag.
    """
    try:
        lines = Path(path).read_text(encoding="latin-1").splitlines()
    except OSError as bad:
        raise QaInputError(f"{path}: cannot read ({bad.strerror})") from None
    points: dict[tuple[float, float], float] = {}
    inplane: float | None = None
    scale = 1.0
    in_data = False
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        try:
            if line.startswith("BEGIN_SCAN") and not line.startswith("BEGIN_SCAN_DATA"):
                inplane, scale = None, 1.0
            elif line.startswith("SCAN_OFFAXIS_INPLANE="):
                inplane = float(line.split("=", 1)[1])
            elif line.startswith("MEAS_UNIT="):
                unit = line.split("=", 1)[1].strip().upper()
                if unit not in _UNIT_GY:
                    raise QaInputError(f"{path}:{number}: MEAS_UNIT {unit}: only GY, CGY or MGY compare")
                scale = _UNIT_GY[unit]
            elif line == "BEGIN_DATA":
                if inplane is None:
                    raise QaInputError(f"{path}:{number}: a scan without SCAN_OFFAXIS_INPLANE")
                in_data = True
            elif line == "END_DATA":
                in_data = False
            elif in_data and line:
                fields = line.split()
                points[(inplane, float(fields[0]))] = float(fields[1]) * scale  # type: ignore[index]
        except QaInputError:
            raise
        except (IndexError, ValueError):
            raise QaInputError(f"{path}:{number}: cannot read {line!r} as a number") from None
    if not points:
        raise QaInputError(f"{path}: no measured points (no BEGIN_DATA blocks)")
    y = np.array(sorted({key[0] for key in points}))
    x = np.array(sorted({key[1] for key in points}))
    dose = np.full((1, y.size, x.size), np.nan)
    for (row, column), value in points.items():
        dose[0, int(np.searchsorted(y, row)), int(np.searchsorted(x, column))] = value
    if not np.nanmax(dose) > 0:
        raise QaInputError(f"{path}: every measured dose is zero")
    return DoseGrid(path, np.array([z_mm]), y, x, dose)


@dataclass(frozen=True)
class Comparison:
    """The reference and the recalculated dose on the grids gamma compares (2-D or 3-D)."""

    reference: DoseGrid
    evaluated: DoseGrid

    @property
    def dimensions(self) -> int:
        return 2 if self.reference.is_plane else 3

    def axes(self, grid: DoseGrid) -> tuple[np.ndarray, ...]:
        return (grid.y, grid.x) if self.dimensions == 2 else (grid.z, grid.y, grid.x)

    def values(self, grid: DoseGrid) -> np.ndarray:
        return grid.dose[0] if self.dimensions == 2 else grid.dose


def aligned(reference: DoseGrid, evaluated: DoseGrid, cutoff_gy: float) -> Comparison:
    """The pair gamma compares: 3-D when both are, else the plane of the one that is a plane.

    The reference's points at or above `cutoff_gy` must lie inside the recalculated grid
    (else a size mismatch naming both files).
    """
    if reference.is_plane and not evaluated.is_plane:
        evaluated = evaluated.plane(float(reference.z[0]), reference.path)
    elif evaluated.is_plane:
        reference = reference.plane(float(evaluated.z[0]), evaluated.path)
    counted = np.nan_to_num(reference.dose, nan=-np.inf) >= cutoff_gy
    for name, ref_axis, eval_axis, dim in (
        ("x", reference.x, evaluated.x, 2),
        ("y", reference.y, evaluated.y, 1),
        ("z", reference.z, evaluated.z, 0),
    ):
        if reference.is_plane and name == "z":
            continue
        used = ref_axis[np.any(counted, axis=tuple(d for d in range(3) if d != dim))]
        if used.size and (used[0] < eval_axis[0] - _TOL_MM or used[-1] > eval_axis[-1] + _TOL_MM):
            raise QaInputError(
                f"{reference.path}: its dose above the cutoff spans {name} {used[0]:g} to {used[-1]:g} mm, "
                f"beyond {evaluated.path} ({name} {eval_axis[0]:g} to {eval_axis[-1]:g} mm): size mismatch"
            )
    return Comparison(reference, evaluated)


def evaluated_grid(path: str) -> DoseGrid:
    """The recalculated RTDOSE (written here: PHYSICAL or EFFECTIVE as configured, in Gy)."""
    return read_rtdose_grid(path, rbe=1.0)
