"""A beam's engine run as values: what goes in (BeamInput), what came out (BeamResult).

Small pydantic models passed between Prefect tasks, carrying what the code already
knows (the moqui_tps.in values, the beam's staged input folder, the dose grid, the dose
file's name) so that nothing is parsed back from a file to recover it. The engine input
file itself is written once, when the beam holds its GPU (`tps_text` with the GPUID), by
the backend that launches it.

The input hash covers everything the engine reads for the beam (the moqui_tps.in text
without GPUID, and every file and folder of its staged input: the plan copy, the layer
CSVs and the folders that steer which one the engine reads), so a rerun with identical
inputs is recognised whatever GPU it lands on; it names the beam's job folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.casefolder.content import CaseContent
from tasks.common.labels import beam_label, beam_subject
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.tps_file import format_tps

TPS_NAME = "moqui_tps.in"
TpsValue = bool | int | float | str


class BeamInput(BaseModel):
    """One beam ready to simulate: its engine input values and where its files live."""

    model_config = ConfigDict(frozen=True)

    case_id: str
    beam_number: int
    beam_name: str
    beam_dir: str  # work/<case>/beams/beam-NN: attempt logs, input/, jobs/, dose/
    stage_dir: str  # this beam's own input folder (plan/, log/), tasks/moqui/staging.py
    records: int  # spot records in its layer CSVs: what the engine must report reading
    tps: dict[str, TpsValue]  # every moqui_tps.in key but GPUID, with this machine's paths
    grid: PhantomGrid  # the grid the dose comes back on (the phantom, or the 2 cm plane)
    dose_name: str  # the engine's output file in OutputDir; a '*' in it matches anything
    input_hash: str
    case_content: CaseContent  # the case folder as discovery read it: checked before each launch

    @property
    def label(self) -> str:
        return beam_label(self.beam_number, self.beam_name)

    @property
    def subject(self) -> str:
        return beam_subject(self.case_id, self.beam_number, self.beam_name)

    @property
    def dose_dir(self) -> Path:
        return Path(self.beam_dir) / "dose"

    def dose_match(self, names: Iterable[str]) -> str | None:
        """The one file name among `names` that the engine's output name fits; None if none or several."""
        found = [name for name in names if fnmatch.fnmatchcase(name, self.dose_name)]
        return found[0] if len(found) == 1 else None

    @property
    def dose_bytes(self) -> int:
        """Size of a raw dose file on this grid (float64 per voxel)."""
        return self.grid.voxel_count * 8

    def tps_text(self, gpu: int, paths: dict[str, str] | None = None) -> str:
        """The moqui_tps.in for `gpu`, with its folder keys replaced by `paths` (another host's) if given."""
        return format_tps({"GPUID": gpu, **self.tps, **(paths or {})})


class BeamResult(BaseModel):
    """A finished beam: its input, what ran, where, and how often (small: passed between tasks)."""

    model_config = ConfigDict(frozen=True)

    beam: BeamInput
    dose_file: str  # the engine's dose file, here
    histories: int | None = None  # as the engine reported them
    beamlets: int | None = None
    engine_log: str
    engine_command: list[str]
    host: str
    gpu: int
    attempts: int
    started: float
    ended: float
    backend: str = "local"
    job_dir: str = ""


def input_hash(tps_text: str, stage_dir: Path) -> str:
    """sha256 over the tps text (without GPUID) and every folder and file of the staged input."""
    digest = hashlib.sha256(tps_text.encode())
    for path in sorted(stage_dir.rglob("*")):
        digest.update(path.relative_to(stage_dir).as_posix().encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()
