"""The pictures a physicist reads at a glance: per beam the two planes, the gamma map and a
profile through the maximum; per case one report of every beam's verdict (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from tasks.dose.files import atomic
from tasks.qa.grids import Comparison
from tasks.qa.model import BeamQa, format_percent

_GAMMA_COLOURS = ListedColormap(["#1a9850", "#91cf60", "#d9ef8b", "#fee08b", "#fc8d59", "#d73027"])


def _plane_index(comparison: Comparison) -> int:
    """The slice through the reference maximum (0 for a plane)."""
    if comparison.dimensions == 2:
        return 0
    reference = np.nan_to_num(comparison.reference.dose, nan=-np.inf)
    return int(np.unravel_index(np.argmax(reference), reference.shape)[0])


def _extent(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    dx = (x[1] - x[0]) / 2 if x.size > 1 else 0.5
    dy = (y[1] - y[0]) / 2 if y.size > 1 else 0.5
    return (float(x[0] - dx), float(x[-1] + dx), float(y[0] - dy), float(y[-1] + dy))


def _save(figure: plt.Figure, path: Path) -> None:
    with atomic(path) as tmp, tmp.open("wb") as stream:
        figure.savefig(stream, format="png", dpi=80)
    plt.close(figure)


VIEW_MARGIN_MM = 15.0  # around the reference's dose above 1 % of its maximum


Limits = tuple[float, float]


def _window(plane: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[Limits, Limits]:
    """The x and y limits that show the dose (above 1 % of the maximum) with a margin, not the empty grid."""
    dosed = np.nan_to_num(plane, nan=0.0) >= 0.01 * float(np.nanmax(plane))
    xs, ys = x[np.any(dosed, axis=0)], y[np.any(dosed, axis=1)]
    return (
        (float(xs[0]) - VIEW_MARGIN_MM, float(xs[-1]) + VIEW_MARGIN_MM),
        (float(ys[0]) - VIEW_MARGIN_MM, float(ys[-1]) + VIEW_MARGIN_MM),
    )


def beam_picture(
    path: Path, title: str, comparison: Comparison, gamma: np.ndarray, qa: BeamQa, surface_mm: float
) -> Path:
    """Write the beam's PNG: recalculated and reference planes, gamma map, profile through the maximum.

    The maps show the reference's dosed region (depth = `surface_mm` - z)."""
    k = _plane_index(comparison)
    ref, ev = comparison.reference, comparison.evaluated
    ref_plane = ref.dose[k]
    if comparison.dimensions == 3:
        ev_plane = ev.plane(float(ref.z[k]), ref.path).dose[0]
    else:
        ev_plane = ev.dose[0]
    gamma_plane = gamma if comparison.dimensions == 2 else gamma[k]
    top = float(np.nanmax(ref_plane))
    figure, axes = plt.subplots(2, 2, figsize=(11, 9))
    depth = f"z = {float(ref.z[k]):.1f} mm, {surface_mm - float(ref.z[k]):.1f} mm deep"
    (x_lim, y_lim) = _window(ref_plane, ref.x, ref.y)
    for ax, plane, x, y, name in (
        (axes[0, 0], ev_plane, ev.x, ev.y, f"recalculated ({Path(ev.path).name})"),
        (axes[0, 1], ref_plane, ref.x, ref.y, f"reference ({Path(ref.path).name})"),
    ):
        shown = ax.imshow(
            np.ma.masked_invalid(plane),
            origin="lower",
            extent=_extent(x, y),
            vmin=0,
            vmax=top,
            cmap="viridis",
            interpolation="nearest",
            aspect="equal",
        )
        ax.set_title(f"{name}\n{depth}", fontsize=9)
        ax.set_xlim(*x_lim)
        ax.set_ylim(*y_lim)
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)")
        figure.colorbar(shown, ax=ax, label="dose (Gy)")
    shown = axes[1, 0].imshow(
        np.ma.masked_invalid(gamma_plane),
        origin="lower",
        extent=_extent(ref.x, ref.y),
        vmin=0,
        vmax=1.5,
        cmap=_GAMMA_COLOURS,
        interpolation="nearest",
        aspect="equal",
    )
    failing = int(np.count_nonzero(np.nan_to_num(gamma_plane) > 1))
    axes[1, 0].set_title(f"gamma ({qa.criteria}); {failing} points > 1 in this plane", fontsize=9)
    axes[1, 0].set_xlim(*x_lim)
    axes[1, 0].set_ylim(*y_lim)
    axes[1, 0].set_xlabel("x (mm)")
    axes[1, 0].set_ylabel("y (mm)")
    figure.colorbar(shown, ax=axes[1, 0], label="gamma")
    row = int(np.unravel_index(np.nanargmax(ref_plane), ref_plane.shape)[0])
    y_row = float(ref.y[row])
    ev_row = int(np.argmin(np.abs(ev.y - y_row)))
    profile = axes[1, 1]
    profile.plot(ev.x, ev_plane[ev_row], "-", label="recalculated")
    marker = "o" if np.isnan(ref_plane).any() else "--"
    measured = np.isfinite(ref_plane[row])
    profile.plot(ref.x[measured], ref_plane[row][measured], marker, label="reference", markersize=4)
    profile.set_title(f"profile through the maximum, y = {y_row:.1f} mm", fontsize=9)
    profile.set_xlim(*x_lim)
    profile.set_xlabel("x (mm)")
    profile.set_ylabel("dose (Gy)")
    profile.legend()
    profile.grid(alpha=0.3)
    verdict = "PASS" if qa.verdict == "pass" else "FAIL"
    figure.suptitle(
        f"{title}: {verdict}, {format_percent(qa.pass_rate or 0.0)} of {qa.points} points pass "
        f"(action level {qa.action_level:g} %); mean gamma {qa.mean_gamma:.2f}, max {qa.max_gamma:.2f}",
        fontsize=11,
        color="#1a7f37" if qa.verdict == "pass" else "#cf222e",
    )
    figure.tight_layout()
    _save(figure, path)
    return path


def case_report(path: Path, title: str, rows: list[tuple[str, BeamQa]]) -> Path:
    """Write the case's QA report (PNG): each beam's pass rate against the action level, and its figures."""
    figure, (bars, table) = plt.subplots(
        2, 1, figsize=(10, 3 + 0.5 * len(rows)), gridspec_kw={"height_ratios": [2, 1 + 0.3 * len(rows)]}
    )
    labels = [label for label, _ in rows]
    rates = [qa.pass_rate or 0.0 for _, qa in rows]
    colours = [{"pass": "#2da44e", "fail": "#cf222e"}.get(qa.verdict, "#8c959f") for _, qa in rows]
    bars.barh(labels, rates, color=colours)
    levels = {qa.action_level for _, qa in rows if qa.action_level is not None}
    for level in levels:
        bars.axvline(level, color="black", linestyle="--", linewidth=1, label=f"action level {level:g} %")
    bars.set_xlim(0, 100)
    bars.invert_yaxis()
    bars.set_xlabel("gamma pass rate (%)")
    if levels:
        bars.legend(loc="lower left")
    bars.set_title(title, fontsize=11)
    cells = [
        [
            label,
            qa.verdict,
            qa.kind,
            "" if qa.pass_rate is None else format_percent(qa.pass_rate),
            "" if qa.mean_gamma is None else f"{qa.mean_gamma:.2f}",
            "" if qa.max_gamma is None else f"{qa.max_gamma:.2f}",
            "" if qa.points is None else str(qa.points),
            qa.criteria or qa.message[:60],
        ]
        for label, qa in rows
    ]
    table.axis("off")
    grid = table.table(
        cellText=cells,
        colLabels=["beam", "verdict", "reference", "pass rate", "mean γ", "max γ", "points", "criteria"],
        loc="center",
        cellLoc="left",
    )
    grid.auto_set_font_size(False)
    grid.set_fontsize(8)
    grid.auto_set_column_width(list(range(8)))
    figure.tight_layout()
    _save(figure, path)
    return path
