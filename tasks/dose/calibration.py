"""The engine's dose in Gy, and whether a beam's dose can be right at all.

The public engine runs int(count x ParticlesPerHistory) histories per spot record and
multiplies what it scores by ParticlesPerHistory again (mqi_tps_env.hpp), so its raw
values scale with the square of that setting; the profile says with which power, and
dose.gy_per_unit is the site's commissioned calibration (README, "Commissioning the
dose scale"). A dose that is all zero, holds NaN or infinity, or whose maximum is
outside dose.plausible_max_gy is never a result: the engine exits 0 in many of those
cases (no spots read, no histories, a rotated-away phantom).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from config.settings import Settings
from tasks.dose.chunks import DoseSource, peak_dose
from tasks.dose.model import RtDoseError
from tasks.moqui.grid import PhantomGrid


def dose_scale(settings: Settings) -> float:
    """Gy per raw unit of the engine's output, as configured."""
    power = settings.engine_profile.raw_dose_pph_power
    return settings.dose.gy_per_unit * settings.tps.particles_per_history**power


def raw_dose_problem(
    path: Path, grid: PhantomGrid, scale: float, plausible: tuple[float, float]
) -> str | None:
    """Why the raw dose at `path` cannot be a beam's dose, or None; one pass over the file."""
    try:
        peak = peak_dose([DoseSource(path, 0, np.dtype(np.float64), grid.shape, scale, True)])
    except RtDoseError as bad:
        return str(bad)
    low, high = plausible
    if peak == 0:
        return f"{path}: the dose is zero everywhere"
    if not low <= peak <= high:
        return (
            f"{path}: maximum dose {peak:.3g} Gy is outside the plausible range {low:g}-{high:g} Gy "
            "(dose.plausible_max_gy; check dose.gy_per_unit and tps.particles_per_history)"
        )
    return None
