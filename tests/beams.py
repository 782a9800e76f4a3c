"""Helpers for backend tests: beams ready to simulate, and one beam run without Prefect."""

from __future__ import annotations

import json
from pathlib import Path

from config import Settings
from standins.sample_case import write_sample_case
from tasks.backends import Backend, Followed, follow
from tasks.casefolder import discover_case
from tasks.interpret import run_interpreter
from tasks.tps import BeamInput, with_gpu, write_beam_input


def prepare_beams(settings: Settings, case_id: str, beams: int = 1) -> list[BeamInput]:
    """A sample case interpreted and its moqui_tps.in files written: what `simulate` receives."""
    case_dir = write_sample_case(settings.scan_dir, case_id, beams=beams)
    case = discover_case(case_dir, ready_marker=settings.case.ready_marker)
    csv_dir = run_interpreter(settings, case)
    return [write_beam_input(settings, case, beam, csv_dir) for beam in case.beams]


def launch(backend: Backend, beam: BeamInput, gpu: int = 0):
    """Stage and launch one beam's job on `gpu` (what simulate does under a GPU lease)."""
    backend.stage(beam)
    with_gpu(Path(beam.tps_path), gpu)
    return backend.launch(beam, gpu)


def run_beam(backend: Backend, beam: BeamInput, gpu: int = 0) -> Followed:
    """Launch one beam and follow it to its end."""
    job = launch(backend, beam, gpu)
    return follow(backend, job, backend.engine_argv(beam, gpu), Path(beam.beam_dir) / "engine.log")


def launches(log: Path, since: int = 0) -> dict[str, int]:
    """Engine launches per beam number, from the stand-in engine's launch record after byte `since`."""
    counts: dict[str, int] = {}
    if not log.exists():
        return counts
    with log.open("rb") as stream:
        stream.seek(since)
        lines = stream.read().decode().splitlines()
    for line in lines:
        record = json.loads(line)
        if record["tool"] == "engine" and record["event"] == "start":
            counts[record["key"]] = counts.get(record["key"], 0) + 1
    return counts
