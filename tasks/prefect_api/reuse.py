"""Reuse of finished beam simulations by later runs of the same case.

A beam costs minutes of GPU time, so a rerun (`mqi rerun`, or Retry of a failed run in
the UI) simulates only the beams whose inputs changed or whose simulation did not finish.
The simulate task is cached under a key from the beam's input hash (BeamInput.input_hash:
moqui_tps.in without GPUID, the plan copy, the beam's layer CSVs) and the engine command,
and its results are stored in paths.results_dir, where every later run that sees that
folder finds them (every worker machine, when it is shared). A stored result only points
at the dose file, so it is reused only while that file is still the one the simulation
wrote: gone, or modified after the result was stored (a later run with other inputs
writes the same path), and the beam is simulated again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from config.settings import Settings
from tasks.moqui.beam import BeamInput


def results_dir(settings: Settings) -> Path:
    """Where simulate results are stored (paths.results_dir): shared by every run that sees that path."""
    return settings.results_dir


def simulation_key(settings: Settings, beam: BeamInput) -> str:
    """Same inputs and same engine: same dose, whichever GPU or run computed it."""
    engine = json.dumps(settings.engine.command)
    return "simulate-" + hashlib.sha256(f"{beam.input_hash}\0{engine}".encode()).hexdigest()


def simulation_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """cache_key_fn of the simulate task (its parameters are `settings` and `beam`)."""
    return simulation_key(parameters["settings"], parameters["beam"])


def stale_reason(settings: Settings, beam: BeamInput) -> str | None:
    """Why the stored simulation of `beam` must not be reused; None if it may be, or none is stored."""
    key = simulation_key(settings, beam)
    record = results_dir(settings) / key
    if not record.is_file():
        return None
    try:
        store = ResultStore(result_storage=LocalFileSystem(basepath=str(results_dir(settings))))
        dose = Path(store.read(key).result.dose_file)
    except Exception as error:  # an unreadable record (e.g. written by an older version) is simply not reused
        return f"its stored result {record} cannot be read ({type(error).__name__}: {error})"
    try:
        written = dose.stat().st_mtime_ns
    except FileNotFoundError:
        return f"its dose file {dose} is gone"
    if written > record.stat().st_mtime_ns:
        return f"its dose file {dose} was rewritten after the result was stored"
    return None


def beams_to_simulate_again(
    settings: Settings, beams: list[BeamInput], rerun: list[int], force: bool
) -> dict[int, str]:
    """Beam number -> why its stored simulation is not reused; beams not listed may be reused.

    `rerun` names beams asked for again, `force` asks for all; a beam number that is not a
    treatment beam of the case is an error (naming the case and the treatment beams).
    """
    numbers = [beam.beam_number for beam in beams]
    unknown = sorted(set(rerun) - set(numbers))
    if unknown:
        case_id = beams[0].case_id if beams else "?"
        raise ValueError(
            f"case {case_id}: beam(s) {', '.join(map(str, unknown))} asked to rerun are not treatment "
            f"beams of the plan (treatment beams: {', '.join(map(str, numbers))})"
        )
    again: dict[int, str] = {}
    for beam in beams:
        if force or beam.beam_number in rerun:
            again[beam.beam_number] = "asked to simulate again"
        elif (reason := stale_reason(settings, beam)) is not None:
            again[beam.beam_number] = f"stored simulation not reused: {reason}"
    return again
