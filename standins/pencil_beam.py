"""Analytic proton pencil-beam dose in a homogeneous water box: the stand-in engine's physics.

The real engine (MOQUI) is a GPU Monte Carlo code. This module computes the
same quantity, physical dose in Gy on the phantom grid, with a classic
analytic pencil-beam model, so the pipeline yields believable dose without a
GPU. It is a test double, not a commissioned beam model: no CT, no
heterogeneities, no range shifter, no nuclear halo, parallel (non-divergent)
beams.

Model, per energy layer (all lengths in water, rho = 1 g/cm^3):

* Range: Bragg-Kleeman rule R0 = alpha * E0^p with alpha = 0.0022 cm/MeV^p,
  p = 1.77 (Bortfeld 1997, "An analytical approximation of the Bragg curve
  for therapeutic proton beams", Med. Phys. 24:2024). 150 MeV -> 15.6 cm.
* Depth dose per proton (the integral depth dose, MeV/cm): Bortfeld's
  unstraggled curve (ibid.): the Bragg-Kleeman stopping power
  (R0 - z)^(1/p - 1) / (p alpha^(1/p)) weighted by the primary fluence, which
  falls linearly through nuclear interactions (beta = 0.012 /cm), plus the
  locally deposited fraction gamma = 0.6 of the energy they release. Each cell
  of a fine 1-D grid (0.05 mm) gets the exact cell average of that curve (from
  its antiderivative), so the integrable singularity at R0 stays finite; the
  grid is then convolved numerically with a Gaussian range straggling of
  sigma^2 = (0.012 R0^0.935)^2 + (0.01 E0 alpha p E0^(p-1))^2 cm^2 (straggling
  in water plus a 1 % energy spread; ibid.). Integrated, the curve
  deposits E0 (1 + beta R0 (1 + gamma p) / (1 + p)) / (1 + beta R0) per proton.
* Lateral spread: a Gaussian whose variance grows with depth,
  sigma(z)^2 = sigma_spot^2 + sigma_MCS(z)^2. sigma_spot is the in-air spot
  size at the isocentre (4 mm default, typical of cyclotron gantries).
  sigma_MCS is the Fermi-Eyges moment (Eyges 1948, Phys. Rev. 74:1534)
  y^2(z) = int_0^z (z-z')^2 T(z') dz' of the Rossi-form scattering power
  T = (Es / pv)^2 / X0 with Highland's Es = 14.1 MeV and X0 = 36.08 cm
  (Highland 1975, NIM 129:497; see Gottschalk 2010, Med. Phys. 37:352, for
  this and better scattering powers), with pv from the residual range R0 - z
  through the same Bragg-Kleeman rule. It reaches about 2.4 % of R0 at the
  end of range (3.7 mm at 150 MeV), the usual order of magnitude.
* Dose: D = Phi * S/rho * 1.602e-10 Gy per MeV/g, where Phi (protons/cm^2)
  is the sum of the spots' normalised 2-D Gaussians, each carrying
  MU * PROTONS_PER_MU protons, and S/rho is the depth dose above.

Geometry: the public engine's beam-aligned water phantom (its source, mqi_tps_env.hpp
setup_world and the gtr beam models): the beam axis is x = y = 0, the beam travels -z
and enters the water at its surface (the phantom's top z face, or the given surface),
a spot's (x, y) from the delivery log is its position across the beam, and a voxel's
depth is surface - z at its centre. Gantry angle and isocentre play no part.

Speed: voxels are sorted by depth once per beam. Per layer, sigma(z) grows
monotonically with depth, so voxels fall into a few dozen runs of nearly equal
sigma (SIGMA_STEP apart); for each run the spots' Gaussian fluence is
evaluated exactly on a beam's-eye-view grid of pitch sigma/4 as one matrix
product (separable Gaussians) and read at the voxels bilinearly (<1 % error).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tasks.moqui.grid import PhantomGrid

ALPHA_CM = 0.0022  # Bragg-Kleeman alpha for water, cm / MeV^p
P_EXPONENT = 1.77  # Bragg-Kleeman exponent p for water
BETA_PER_CM = 0.012  # fractional primary fluence lost to nuclear interactions per cm
GAMMA_LOCAL = 0.6  # fraction of nuclear-interaction energy deposited locally
ENERGY_SPREAD = 0.01  # relative (1 sigma) energy spread of the beam
PROTON_MASS_MEV = 938.272
HIGHLAND_ES_MEV = 14.1
WATER_X0_CM = 36.08  # radiation length of water
MEV_PER_G_IN_GY = 1.602176634e-10  # 1 MeV/g = 1.602e-13 J / 1e-3 kg

DEFAULT_SPOT_SIGMA_MM = 4.0
# Protons per monitor unit. A real machine's calibration depends on energy and
# chamber; this constant gives order-1 Gy for the sample case's spot weights.
PROTONS_PER_MU = 1.0e8
# Monitor counts per MU in the delivery logs' spot records (the interpreter's MU column):
# the sample case writes its logs with it, the stand-in engine reads them back with it.
COUNTS_PER_MU = 1000.0

FINE_STEP_CM = 0.005  # 1-D depth grid for depth dose and scattering
STRAGGLING_CUT = 6.0  # depth-dose tails are cut this many straggling sigmas past R0
LATERAL_CUT = 5.0  # fluence is evaluated this many lateral sigmas around the spots
SIGMA_STEP = 0.01  # relative width of the equal-sigma runs of voxels
BEV_PITCH_PER_SIGMA = 0.25  # beam's-eye-view grid pitch as a fraction of sigma


@dataclass(frozen=True, eq=False)
class Layer:
    """One energy layer as delivered: spot positions in the isocentre plane and their MU."""

    energy_mev: float
    spots_mm: np.ndarray  # shape (n, 2): BEV x, BEV y
    mu: np.ndarray  # shape (n,)


def bragg_kleeman_range_cm(energy_mev: float) -> float:
    """CSDA range in water, R0 = alpha * E^p."""
    return ALPHA_CM * energy_mev**P_EXPONENT


def straggling_sigma_cm(energy_mev: float) -> float:
    """Range straggling in water combined with the beam's energy spread (Bortfeld 1997)."""
    range_cm = bragg_kleeman_range_cm(energy_mev)
    straggling = 0.012 * range_cm**0.935
    spread = ENERGY_SPREAD * energy_mev * ALPHA_CM * P_EXPONENT * energy_mev ** (P_EXPONENT - 1)
    return math.hypot(straggling, spread)


def depth_dose(energy_mev: float) -> tuple[np.ndarray, np.ndarray]:
    """Depth (mm, cell centres) and integral depth dose per proton (MeV/cm) for one energy.

    Covers from STRAGGLING_CUT sigmas before the surface (where the unstraggled
    curve is extended so the convolution is right at the entrance) to
    STRAGGLING_CUT sigmas past R0; beyond that the dose is zero.
    """
    r0 = bragg_kleeman_range_cm(energy_mev)
    sigma = straggling_sigma_cm(energy_mev)
    step = min(FINE_STEP_CM, sigma / 10)
    cut = math.ceil(STRAGGLING_CUT * sigma / step)
    before = math.ceil(r0 / step) + cut
    # Residual range at cell edges; cells past R0 hold no unstraggled dose.
    residual = np.maximum(step * np.arange(before, -cut - 1, -1, dtype=float), 0.0)
    inv_p = 1 / P_EXPONENT
    nuclear = BETA_PER_CM + GAMMA_LOCAL * BETA_PER_CM * P_EXPONENT
    scale = 1 / (P_EXPONENT * ALPHA_CM**inv_p * (1 + BETA_PER_CM * r0))
    # Antiderivative of Bortfeld's unstraggled curve in terms of residual range.
    antiderivative = scale * (P_EXPONENT * residual**inv_p + nuclear * residual ** (inv_p + 1) / (inv_p + 1))
    unstraggled = -np.diff(antiderivative) / step
    offsets = step * np.arange(-cut, cut + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    straggled = np.convolve(unstraggled, kernel / kernel.sum(), mode="same")
    centres_cm = r0 - step * (np.arange(before, -cut, -1) - 0.5)
    return 10 * centres_cm, straggled


def mcs_sigma(energy_mev: float) -> tuple[np.ndarray, np.ndarray]:
    """Depth (mm) and Fermi-Eyges rms lateral displacement from scattering (mm), 0 to R0.

    The three Fermi-Eyges moments obey d<theta^2>/dz = T, d<y theta>/dz =
    <theta^2>, d<y^2>/dz = 2 <y theta>; integrating them in turn avoids the
    cancellation of the (z - z')^2 form.
    """
    r0 = bragg_kleeman_range_cm(energy_mev)
    cells = math.ceil(r0 / FINE_STEP_CM)
    edges = np.linspace(0.0, r0, cells + 1)
    step = edges[1]
    residual = r0 - (edges[:-1] + step / 2)
    kinetic = (residual / ALPHA_CM) ** (1 / P_EXPONENT)
    pv = kinetic * (kinetic + 2 * PROTON_MASS_MEV) / (kinetic + PROTON_MASS_MEV)
    power = (HIGHLAND_ES_MEV / pv) ** 2 / WATER_X0_CM
    theta2 = np.concatenate([[0.0], np.cumsum(power * step)])
    y_theta = np.concatenate([[0.0], np.cumsum((theta2[:-1] + theta2[1:]) / 2 * step)])
    y2 = np.concatenate([[0.0], np.cumsum((y_theta[:-1] + y_theta[1:]) * step)])
    return 10 * edges, 10 * np.sqrt(y2)


@dataclass(frozen=True, eq=False)
class _EnergyModel:
    """Depth dose and lateral sigma of one energy, tabulated for fast lookup."""

    idd_depth_mm: np.ndarray
    idd: np.ndarray
    mcs_depth_mm: np.ndarray
    mcs_mm: np.ndarray
    spot_sigma_mm: float

    @classmethod
    def build(cls, energy_mev: float, spot_sigma_mm: float) -> _EnergyModel:
        idd_depth, idd = depth_dose(energy_mev)
        mcs_depth, mcs = mcs_sigma(energy_mev)
        return cls(idd_depth, idd, mcs_depth, mcs, spot_sigma_mm)

    @property
    def max_depth_mm(self) -> float:
        return float(self.idd_depth_mm[-1])

    def idd_at(self, depth_mm: np.ndarray) -> np.ndarray:
        return np.interp(depth_mm, self.idd_depth_mm, self.idd, right=0.0)

    def sigma_at(self, depth_mm: np.ndarray) -> np.ndarray:
        """Lateral sigma (mm); past R0 the few straggling protons keep the end-of-range width."""
        mcs = np.interp(depth_mm, self.mcs_depth_mm, self.mcs_mm)
        return np.sqrt(self.spot_sigma_mm**2 + mcs**2)


class _BeamGeometry:
    """Every voxel's lateral coordinates and water depth, sorted by depth."""

    def __init__(self, grid: PhantomGrid, surface_mm: float | None):
        nx, ny, nz = grid.dims
        x0, y0, z0 = grid.position
        dx, dy, dz = grid.spacing
        surface = z0 + nz * dz if surface_mm is None else surface_mm
        x = x0 + (np.arange(nx) + 0.5) * dx
        y = y0 + (np.arange(ny) + 0.5) * dy
        depth = surface - (z0 + (np.arange(nz) + 0.5) * dz)
        u = np.broadcast_to(x[None, None, :], grid.shape).ravel()
        v = np.broadcast_to(y[None, :, None], grid.shape).ravel()
        depth = np.broadcast_to(depth[:, None, None], grid.shape).ravel()
        self.shape = grid.shape
        self.order = np.argsort(depth, kind="stable")
        self.depth = depth[self.order]
        self.u = u[self.order]
        self.v = v[self.order]


def _fluence_at(
    u: np.ndarray, v: np.ndarray, spots_mm: np.ndarray, protons: np.ndarray, sigma_mm: float
) -> np.ndarray:
    """Sum of the spots' normalised 2-D Gaussians (protons/cm^2) at points (u, v) in mm.

    Evaluated exactly on a BEV grid as (G_u^T diag(N)) G_v, then read bilinearly;
    points outside the grid (beyond LATERAL_CUT sigmas) get zero.
    """
    pitch = BEV_PITCH_PER_SIGMA * sigma_mm
    margin = LATERAL_CUT * sigma_mm
    low = spots_mm.min(axis=0) - margin
    counts = np.ceil((spots_mm.max(axis=0) + margin - low) / pitch).astype(int) + 1
    profiles = []
    for axis in (0, 1):
        nodes = low[axis] + pitch * np.arange(counts[axis])
        offsets = (nodes[None, :] - spots_mm[:, axis, None]) / sigma_mm
        profiles.append(np.exp(-0.5 * offsets**2))
    per_mm2 = (profiles[0] * protons[:, None]).T @ profiles[1] / (2 * math.pi * sigma_mm**2)
    table = 100.0 * per_mm2  # per cm^2
    fu = (u - low[0]) / pitch
    fv = (v - low[1]) / pitch
    inside = (fu >= 0) & (fu < counts[0] - 1) & (fv >= 0) & (fv < counts[1] - 1)
    iu = np.where(inside, fu, 0).astype(np.intp)
    iv = np.where(inside, fv, 0).astype(np.intp)
    tu = fu - iu
    tv = fv - iv
    flat = table.ravel()
    corner = iu * counts[1] + iv
    value = (
        (1 - tu) * (1 - tv) * flat[corner]
        + (1 - tu) * tv * flat[corner + 1]
        + tu * (1 - tv) * flat[corner + counts[1]]
        + tu * tv * flat[corner + counts[1] + 1]
    )
    return np.where(inside, value, 0.0)


def compute_dose(
    grid: PhantomGrid,
    layers: Sequence[Layer],
    *,
    surface_mm: float | None = None,
    spot_sigma_mm: float = DEFAULT_SPOT_SIGMA_MM,
    protons_per_mu: float = PROTONS_PER_MU,
    on_layer: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Physical dose (Gy) of one beam on `grid`, numpy shape (nz, ny, nx).

    The water surface is the grid's top z face unless `surface_mm` says where (a scoring plane
    under water). `on_layer(k)` (k 1-based) is called before each layer, to report progress.
    """
    beam = _BeamGeometry(grid, surface_mm)
    dose_sorted = np.zeros(beam.depth.size)
    for number, layer in enumerate(layers, start=1):
        if on_layer is not None:
            on_layer(number)
        spots = np.asarray(layer.spots_mm, dtype=float).reshape(-1, 2)
        protons = np.asarray(layer.mu, dtype=float) * protons_per_mu
        if not protons.any():
            continue
        model = _EnergyModel.build(layer.energy_mev, spot_sigma_mm)
        reached = int(np.searchsorted(beam.depth, model.max_depth_mm, side="right"))
        if reached == 0:
            continue
        depth = beam.depth[:reached]
        energy_per_cm = model.idd_at(depth)
        sigma = model.sigma_at(depth)
        # sigma never decreases with depth, so equal-sigma runs are contiguous.
        run_id = np.floor(np.log(sigma / sigma[0]) / math.log1p(SIGMA_STEP)).astype(np.intp)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(run_id)) + 1, [reached]])
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            run_sigma = 0.5 * (sigma[start] + sigma[stop - 1])
            fluence = _fluence_at(beam.u[start:stop], beam.v[start:stop], spots, protons, run_sigma)
            dose_sorted[start:stop] += fluence * energy_per_cm[start:stop] * MEV_PER_G_IN_GY
    dose = np.empty_like(dose_sorted)
    dose[beam.order] = dose_sorted
    return dose.reshape(beam.shape)
