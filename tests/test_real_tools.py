"""Whole cases through the case flow with the clinic's real interpreter and the real MOQUI engine (CPU).

The configuration is config/examples/real-tools.yaml as it ships, only its data root moved (and
the mode under test set): swapping the stand-ins for the real tools is a configuration change.
The tools come from the environment (.ci/run builds them from ../shared/tools, cached):
MQI_ENGINE_DIR (the engine's source folder, built), MQI_INTERPRETER_DIR (the unpacked
interpreter) and MQI_INTERPRETER_PYTHON (its venv's python). Where they are not set, these tests
skip, naming the variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from config import load_settings
from config.loader import DEFAULT_CONFIG
from flows.case import process_case
from standins.sample_case import write_sample_case
from tasks.dose.read import read_dose_gy
from tests.test_case_flow import dciodvfy_errors

pytestmark = [pytest.mark.real_tools, pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]

TOOLS = ("MQI_ENGINE_DIR", "MQI_INTERPRETER_DIR", "MQI_INTERPRETER_PYTHON")
EXAMPLE = DEFAULT_CONFIG.parent / "examples" / "real-tools.yaml"


@pytest.fixture(scope="module", autouse=True)
def real_tools() -> None:
    missing = [name for name in TOOLS if not os.environ.get(name)]
    if missing:
        message = (
            f"the real tools are not set up: set {', '.join(missing)} (bash .ci/real-tools.sh prints them)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    engine = Path(os.environ["MQI_ENGINE_DIR"]) / "build" / "tps_env" / "tps_env"
    assert engine.is_file(), f"{engine} is missing: build the engine (bash .ci/real-tools.sh)"


def real_config(tmp_path: Path, **sections: dict) -> Path:
    """real-tools.yaml with its data root under tmp_path and `sections` merged in."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["data_root"] = str(tmp_path / "data")
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):
                data.setdefault(section, {}).setdefault(key, {}).update(value)
            else:
                data.setdefault(section, {})[key] = value
    path = tmp_path / "real-tools.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "data" / "scan").mkdir(parents=True)
    return path


def run_case(config: Path, case_id: str, **case) -> tuple[object, list[dict], Path]:
    settings = load_settings(config)
    case_dir = write_sample_case(settings.scan_dir, case_id, beams=2, layers=4, **case)
    state = process_case(str(case_dir), str(config), return_state=True)
    assert state.is_completed(), state.message
    out = settings.output_dir(case_id)
    provenance = [json.loads(p.read_text()) for p in sorted(out.glob("RTDOSE_beam*.provenance.json"))]
    return state, provenance, out


def depth_of_max_mm(dose: np.ndarray, spacing_mm: float) -> float:
    """Depth below the phantom's top face (its last slice) where the laterally summed dose peaks."""
    profile = dose.sum(axis=(1, 2))[::-1]
    return (int(profile.argmax()) + 0.5) * spacing_mm


def check_beams(provenance: list[dict], out: Path) -> list[np.ndarray]:
    doses = []
    for record in provenance:
        [beam] = record["beams"]
        assert beam["engine_beamlets"] == beam["staged_records"] > 0  # it read exactly this beam's records
        assert beam["engine_histories"] > 0
        path = out / record["rtdose"]
        assert dciodvfy_errors(path) == []
        dose = read_dose_gy(path)
        assert np.isfinite(dose).all() and dose.max() > 0
        doses.append(dose)
    return doses


@pytest.mark.parametrize("scan_mode", ["MODULATED", "LINE"])
def test_a_case_with_a_setup_beam_first_in_the_3d_phantom(tmp_path, scan_mode):
    config = real_config(tmp_path)
    state, provenance, out = run_case(config, f"REAL-{scan_mode}", scan_mode=scan_mode)
    assert state.message == f"REAL-{scan_mode}: 2/2 beams done"
    doses = check_beams(provenance, out)
    # Beams 2 and 3 have different energies (160-145 and 150-135 MeV): each was simulated from its
    # own logs, so their dose maxima lie at different depths (2 mm slices).
    depths = [depth_of_max_mm(dose, 2.0) for dose in doses]
    assert depths[0] > depths[1] + 4, depths
    for dose in doses:  # the dose is where the spots are: the 30 mm square field on the beam axis
        lateral = dose.sum(axis=0)
        centre = np.unravel_index(lateral.argmax(), lateral.shape)
        assert all(abs((index + 0.5) * 2.0 - 60.0) < 15 for index in centre), centre
    ds = pydicom.dcmread(out / provenance[0]["rtdose"])
    assert (
        "water phantom" in ds.DoseComment
        and ds.FrameOfReferenceUID
        != pydicom.dcmread(
            next(load_settings(config).scan_dir.glob(f"REAL-{scan_mode}/RP.*.dcm"))
        ).FrameOfReferenceUID
    )
    assert (out / "RTDOSE_plan.dcm").is_file() and dciodvfy_errors(out / "RTDOSE_plan.dcm") == []


@pytest.mark.parametrize("scan_mode", ["MODULATED", "LINE"])
def test_a_case_in_the_2_cm_plane_mode(tmp_path, scan_mode):
    config = real_config(
        tmp_path, tps={"two_centimeter_mode": True, "phantom": {"dims": [40, 40, 100], "unit_mm": [5, 5, 2]}}
    )
    _, provenance, out = run_case(config, f"PLANE-{scan_mode}", scan_mode=scan_mode)
    for dose in check_beams(provenance, out):
        assert dose.shape == (1, 400, 400)
        y, x = np.unravel_index(dose[0].argmax(), dose[0].shape)
        assert abs(x - 200) < 25 and abs(y - 200) < 25  # 1 mm pixels, the field on the axis


def test_the_real_interpreter_with_the_stand_in_engine(tmp_path):
    config = real_config(
        tmp_path,
        engine={"command": ["{python}", "-m", "standins.tps_env", "{input}"], "workdir": str(tmp_path)},
        dose={"plausible_max_gy": [0.001, 1000]},
        tps={"particles_per_history": 1.0},
    )
    _, provenance, out = run_case(config, "MIXED")
    doses = check_beams(provenance, out)
    assert 0.1 < max(dose.max() for dose in doses) < 100  # the stand-in's dose is in Gy


@pytest.mark.parametrize("scan_mode", ["MODULATED", "LINE"])
def test_the_stand_in_interpreter_writes_what_the_real_one_writes(tmp_path, scan_mode):
    """Same case folder, same arguments: every file the two interpreters write is byte-identical."""
    case_dir = write_sample_case(tmp_path / "scan", "TWIN", beams=2, layers=6, scan_mode=scan_mode)
    written = {}
    for name, argv in {
        "real": [
            os.environ["MQI_INTERPRETER_PYTHON"],
            str(Path(os.environ["MQI_INTERPRETER_DIR"]) / "main_cli.py"),
        ],
        "stand-in": [sys.executable, "-m", "standins.interpreter"],
    }.items():
        out = tmp_path / name
        run = subprocess.run(
            [*argv, "--logdir", str(case_dir), "--outputdir", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, f"{name}: {run.stderr[-2000:]}"
        written[name] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert sorted(written["real"]) == sorted(written["stand-in"])
    assert len(written["real"]) == 1 + 2 * 6  # the plan copy and one CSV per layer
    different = [str(p) for p in written["real"] if written["real"][p] != written["stand-in"][p]]
    assert different == []
