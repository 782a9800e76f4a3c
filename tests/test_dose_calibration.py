"""The dose scale and the sanity of a beam's dose (tasks/dose/calibration.py), on small raw files."""

from __future__ import annotations

import re

import numpy as np
import pytest

from config import load_settings
from tasks.dose.calibration import dose_scale, raw_dose_problem
from tasks.moqui.grid import PhantomGrid
from tests.conftest import write_config

GRID = PhantomGrid(dims=(4, 3, 2), spacing=(1.0, 1.0, 1.0), position=(0.0, 0.0, 0.0))


def raw(tmp_path, values) -> object:
    path = tmp_path / "dose.raw"
    np.asarray(values, dtype="<f8").reshape(GRID.shape).tofile(path)
    return path


def test_the_public_builds_raw_dose_scales_with_the_square_of_particles_per_history(tmp_path):
    config = write_config(tmp_path, {"tps": {"particles_per_history": 0.02}, "dose": {"gy_per_unit": 3.0}})
    settings = load_settings(config, env={})
    assert dose_scale(settings) == pytest.approx(3.0 / 0.02**2)
    clinic = load_settings(config, env={"MQI__ENGINE__PROFILE": "moqui-smc-clinic"})
    assert dose_scale(clinic) == pytest.approx(3.0)  # its scale is commissioned as it is


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (np.zeros(24), "the dose is zero everywhere"),
        ([np.nan] + [1.0] * 23, "must be finite and >= 0"),
        ([np.inf] + [1.0] * 23, "must be finite and >= 0"),
        ([-1.0] + [1.0] * 23, "must be finite and >= 0"),
        ([2e3] + [1.0] * 23, "maximum dose 2e\\+03 Gy is outside the plausible range 0.001-1000 Gy"),
        ([1e-5] + [0.0] * 23, "maximum dose 1e-05 Gy is outside"),
    ],
)
def test_a_dose_that_cannot_be_right_is_named_with_its_file(tmp_path, values, problem):
    path = raw(tmp_path, values)
    found = raw_dose_problem(path, GRID, 1.0, (1e-3, 1e3))
    assert found is not None and str(path) in found
    assert re.search(problem, found), found


def test_a_plausible_dose_passes_after_calibration(tmp_path):
    path = raw(tmp_path, [0.5e-4] * 24)
    assert raw_dose_problem(path, GRID, 1.0, (1e-3, 1e3)) is not None  # 5e-5 Gy uncalibrated
    assert raw_dose_problem(path, GRID, 1e4, (1e-3, 1e3)) is None  # 0.5 Gy
