"""Prefect task: one beam's engine input (tasks/moqui/inputs.py), as values with its input hash.

The moqui_tps.in file is written when the beam holds its GPU, with that GPU's GPUID, by
the backend that launches the engine (in the beam's job folder).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from config.settings import Settings
from tasks.casefolder import Beam, Case
from tasks.moqui.beam import BeamInput
from tasks.moqui.inputs import beam_input


@task(name="tps", task_run_name="tps beam {beam.number}")
def prepare_tps(settings: Settings, case: Case, beam: Beam, csv_dir: str) -> BeamInput:
    """Prefect wrapper: one beam's engine input values, folders and input hash."""
    return beam_input(settings, case, beam, Path(csv_dir))
