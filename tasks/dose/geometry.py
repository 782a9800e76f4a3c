"""The RTDOSE grid: frames x rows x columns placed in patient coordinates, from a phantom or a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tasks.dose.model import RtDoseError
from tasks.moqui.grid import PhantomGrid

_GEOMETRY_TOL_MM = 1e-3


@dataclass(frozen=True)
class DoseGeometry:
    """The RTDOSE grid: frames x rows x columns, positioned at the first voxel centre."""

    rows: int
    columns: int
    frames: int
    position: tuple[float, ...]  # mm, centre of the first voxel
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]  # mm: (between rows = dy, between columns = dx)
    frame_offsets: tuple[float, ...]  # mm, relative to position
    slice_thickness: float | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.rows, self.columns)

    @classmethod
    def from_grid(cls, grid: PhantomGrid) -> DoseGeometry:
        nx, ny, nz = grid.dims
        dx, dy, dz = grid.spacing
        return cls(
            rows=ny,
            columns=nx,
            frames=nz,
            position=grid.first_voxel_centre,
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            pixel_spacing=(dy, dx),
            frame_offsets=tuple(k * dz for k in range(nz)),
            slice_thickness=dz,
        )

    @classmethod
    def from_dataset(cls, ds: Dataset, path: Path) -> DoseGeometry:
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
            offsets = values_of(ds.get("GridFrameOffsetVector")) or [0.0]
            thickness = ds.get("SliceThickness")
            return cls(
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                frames=frames,
                position=tuple(float(v) for v in ds.ImagePositionPatient),
                orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
                pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                frame_offsets=tuple(float(v) for v in offsets),
                slice_thickness=None if thickness in (None, "") else float(thickness),
            )
        except (AttributeError, IndexError, TypeError, ValueError) as bad:
            raise RtDoseError(f"{path}: RTDOSE geometry is incomplete or invalid: {bad}") from None

    def mismatch(self, other: DoseGeometry) -> str | None:
        """Name the first attribute in which `other` differs from this grid, if any."""
        if self.shape != other.shape:
            return f"frames x rows x columns {other.shape} != {self.shape}"
        for name in ("position", "orientation", "pixel_spacing", "frame_offsets"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if len(mine) != len(theirs) or any(
                abs(a - b) > _GEOMETRY_TOL_MM for a, b in zip(mine, theirs, strict=True)
            ):
                return f"{name} {list(theirs)} != {list(mine)}"
        return None


def values_of(value: object) -> list:
    """A DICOM value as a list: pydicom gives a bare value for VM 1 and None when empty."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list) else [value]
