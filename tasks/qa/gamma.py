"""The gamma index (pymedphys) of a recalculated dose against its reference, and its figures.

Gamma is computed at every reference point at or above the low-dose cutoff (a % of the
reference maximum), searching the recalculated dose around it (interpolated by scipy's
RegularGridInterpolator at steps of the distance criterion / `search_steps`). Global normalisation
is to the reference maximum, as the clinic's tools normalise to the measurement's maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pymedphys import gamma

from tasks.qa.grids import Comparison

MAX_GAMMA = 3.0  # the search stops here: a point this far off fails either way (figures capped)


@dataclass(frozen=True)
class Criteria:
    dose_percent: float
    distance_mm: float
    cutoff_percent: float
    local: bool = False
    search_steps: int = 10  # per distance criterion (pymedphys interp_fraction)

    def cutoff_gy(self, reference_max_gy: float) -> float:
        return self.cutoff_percent / 100.0 * reference_max_gy

    def describe(self, dimensions: int) -> str:
        kind = "local" if self.local else "global"
        return (
            f"{self.dose_percent:g} %/{self.distance_mm:g} mm {kind}, "
            f"{self.cutoff_percent:g} % cutoff, {dimensions}-D"
        )


@dataclass(frozen=True)
class GammaFigures:
    pass_rate: float  # % of evaluated points with gamma <= 1
    mean: float
    max: float
    points: int


REFINE_STEPS = 30  # near misses are searched again this finely ...
REFINE_BELOW = 1.2  # ... those with 1 < gamma <= this (benchmarks/gamma.py: 10 steps err by < 0.05 there)


def gamma_map(comparison: Comparison, criteria: Criteria) -> np.ndarray:
    """Gamma at every reference point (NaN where not evaluated), the reference's shape.

    A search in steps of distance / search_steps can miss the best point by a little: a point
    that it finds just above 1 (a near miss) is searched again in REFINE_STEPS steps, so that
    the pass/fail decision does not depend on the step (about 6 points of pass rate at 10 steps,
    where a shift equals the distance criterion).
    """
    reference = np.nan_to_num(comparison.values(comparison.reference), nan=-1.0)  # NaN: never evaluated
    normalisation = float(reference.max())  # the measurement has NaN between its detectors

    def search(points: np.ndarray, steps: int) -> np.ndarray:
        return gamma(
            comparison.axes(comparison.reference),
            points,
            comparison.axes(comparison.evaluated),
            comparison.values(comparison.evaluated),
            dose_percent_threshold=criteria.dose_percent,
            distance_mm_threshold=criteria.distance_mm,
            lower_percent_dose_cutoff=criteria.cutoff_percent,
            global_normalisation=normalisation,
            local_gamma=criteria.local,
            max_gamma=MAX_GAMMA,
            interp_fraction=steps,
            interp_algo="scipy",  # pymedphys's own interpolator needs numba (about 170 MB; not installed)
        )

    found = search(reference, criteria.search_steps)
    near = np.nan_to_num(found) > 1.0
    near &= np.nan_to_num(found) <= REFINE_BELOW
    if criteria.search_steps < REFINE_STEPS and near.any():
        again = search(np.where(near, reference, -1.0), REFINE_STEPS)  # -1: below the cutoff, skipped
        found = np.where(near, np.fmin(found, again), found)
    return found


def figures(gamma: np.ndarray) -> GammaFigures:
    valid = gamma[np.isfinite(gamma)]
    if valid.size == 0:
        return GammaFigures(pass_rate=math.nan, mean=math.nan, max=math.nan, points=0)
    return GammaFigures(
        pass_rate=100.0 * float(np.count_nonzero(valid <= 1.0)) / valid.size,
        mean=float(valid.mean()),
        max=float(valid.max()),
        points=int(valid.size),
    )
