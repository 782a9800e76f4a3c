"""Helpers for backend tests: beams ready to simulate, and one beam run without Prefect."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from config import Settings
from standins.sample_case import write_sample_case
from tasks.backends import Backend, Followed, follow
from tasks.backends.adopt import TakeGpu
from tasks.backends.base import Holder
from tasks.casefolder import discover_case
from tasks.casefolder.content import CaseContent
from tasks.gpu.broker import gpu_lease
from tasks.gpu.pool import GpuPool, SkipReason
from tasks.interpreter.run import run_interpreter
from tasks.moqui.beam import BeamInput
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.inputs import beam_input


def prepare_beams(settings: Settings, case_id: str, beams: int = 1) -> list[BeamInput]:
    """A sample case interpreted and its beams' engine inputs prepared: what `simulate` receives."""
    case_dir = write_sample_case(settings.scan_dir, case_id, beams=beams)
    case = discover_case(case_dir, ready_marker=settings.case.ready_marker)
    csv_dir = run_interpreter(settings, case)
    return [beam_input(settings, case, beam, csv_dir) for beam in case.beams]


def unbacked_content(case_id: str) -> CaseContent:
    """The content of a case that no folder backs (for BeamInputs that are only judged, never launched)."""
    return CaseContent(
        case_id=case_id, case_dir=f"/no/such/{case_id}", ready_marker="_CASE_READY", files=(), key=""
    )


def beam_input_of(settings: Settings, records: int = 1, dose_name: str = "1G000:TX_1_Dose.raw") -> BeamInput:
    """A BeamInput of a case "R" beam 2 that no file backs (for judging and reuse rules)."""
    beam_dir = settings.work_dir("R") / "beams" / "beam-02"
    return BeamInput(
        case_id="R",
        beam_number=2,
        beam_name="1G000:TX",
        beam_dir=str(beam_dir),
        stage_dir=str(beam_dir / "input"),
        records=records,
        tps={},
        grid=PhantomGrid(dims=(2, 2, 2), spacing=(1.0, 1.0, 1.0), position=(0.0, 0.0, 0.0)),
        dose_name=dose_name,
        input_hash="h2",
        case_content=unbacked_content("R"),
    )


def launch(backend: Backend, beam: BeamInput, gpu: int = 0):
    """Stage and launch one beam's job on `gpu` (what simulate does under a GPU lease)."""
    backend.stage(beam)
    return backend.launch(beam, gpu, backend.engine_argv(beam, gpu))


def run_beam(backend: Backend, beam: BeamInput, gpu: int = 0) -> Followed:
    """Launch one beam and follow it to its end."""
    job = launch(backend, beam, gpu)
    return follow(backend, job, backend.engine_argv(beam, gpu), Path(beam.beam_dir) / "engine.log")


def server_gpus(settings: Settings) -> TakeGpu:
    """GPUs leased on the Prefect server, as the simulate task holds them (outside any flow run)."""
    pool = GpuPool.of(settings.backend)

    @contextmanager
    def take_gpu(*, only: Sequence[int] | None = None, skip: SkipReason | None = None) -> Iterator[Holder]:
        with gpu_lease(pool, only=only, skip=skip) as lease:
            yield Holder(run="test", attempt=1, gpu=lease.index, lease=str(lease.lease_id))

    return take_gpu


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
