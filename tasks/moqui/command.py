"""The engine's command line, from its template in the config (placeholders checked when it loaded)."""

from __future__ import annotations

from config.settings import python_executable
from tasks.moqui.beam import BeamInput


def engine_argv(template: list[str], beam: BeamInput, gpu: int, input_path: str) -> list[str]:
    """argv of the engine for `beam` on `gpu`, reading the moqui_tps.in at `input_path`."""
    fields = {
        "python": python_executable(),
        "input": input_path,
        "case_id": beam.case_id,
        "beam_number": str(beam.beam_number),
        "gpu": str(gpu),
    }
    return [part.format(**fields) for part in template]
