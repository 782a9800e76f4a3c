"""The water phantom's dose grid: what the engine scores in, and what the RTDOSE is placed on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tasks.moqui.tps_file import TpsFormatError


@dataclass(frozen=True)
class PhantomGrid:
    """The water phantom's dose grid as moqui_tps.in describes it.

    Convention (the public engine's source: its grid3d edges and ijk2cnb):
    `PhantomPosition*` is the outer corner of the first voxel, in the engine's
    beam-aligned phantom frame (mm); voxel centres are at position + (i + 0.5) * unit.
    The raw dose array is x-fastest: numpy shape (nz, ny, nx), C order; z index 0 is
    the deepest slice (the beam travels -z and enters the top face).
    """

    dims: tuple[int, int, int]  # nx, ny, nz
    spacing: tuple[float, float, float]  # mm: dx, dy, dz
    position: tuple[float, float, float]  # mm: corner of the first voxel

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy shape of the dose array: (nz, ny, nx)."""
        nx, ny, nz = self.dims
        return (nz, ny, nx)

    @property
    def voxel_count(self) -> int:
        nx, ny, nz = self.dims
        return nx * ny * nz

    @property
    def first_voxel_centre(self) -> tuple[float, float, float]:
        return tuple(p + s / 2 for p, s in zip(self.position, self.spacing, strict=True))  # type: ignore[return-value]

    @classmethod
    def from_tps(cls, values: Mapping[str, str], source: str = "moqui_tps.in") -> PhantomGrid:
        try:
            dims = tuple(int(values[f"PhantomDim{a}"]) for a in "XYZ")
            spacing = tuple(float(values[f"PhantomUnit{a}"]) for a in "XYZ")
            position = tuple(float(values[f"PhantomPosition{a}"]) for a in "XYZ")
        except KeyError as missing:
            raise TpsFormatError(f"{source}: phantom key {missing.args[0]} is missing") from None
        except ValueError as bad:
            raise TpsFormatError(f"{source}: phantom key has a non-numeric value: {bad}") from None
        if min(dims) <= 0 or min(spacing) <= 0:
            raise TpsFormatError(f"{source}: phantom dimensions and units must be positive")
        return cls(dims=dims, spacing=spacing, position=position)  # type: ignore[arg-type]

    def tps_values(self, whole_mm: bool = False) -> dict[str, int | float]:
        """The moqui_tps.in keys that describe this grid (`whole_mm`: sizes and position as integers)."""
        number = int if whole_mm else float
        values: dict[str, int | float] = {}
        for axis, dim, unit, pos in zip("XYZ", self.dims, self.spacing, self.position, strict=True):
            values[f"PhantomDim{axis}"] = dim
            values[f"PhantomUnit{axis}"] = number(unit)
            values[f"PhantomPosition{axis}"] = number(pos)
        return values
