"""A beam's engine run as values: what goes in (BeamInput), what came out (BeamResult).

Small pydantic models passed between Prefect tasks, carrying what the code already
knows (the moqui_tps.in values, the interpreter's CSV folder, the phantom grid, the
dose file's name) so that nothing is parsed back from a file to recover it. The engine
input file itself is written once, when the beam holds its GPU (`tps_text` with the
GPUID), by the backend that launches it.

The input hash covers everything the engine reads for the beam (the moqui_tps.in text
without GPUID, the plan copy, the beam's layer CSVs), so a rerun with identical inputs
is recognised whatever GPU it lands on; it names the beam's job folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict

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
    beam_dir: str  # work/<case>/beams/beam-NN: attempt logs, jobs/, dose/
    csv_dir: str  # the interpreter's output folder: plan/ and log/<csv_dir_name>/
    csv_dir_name: str  # this beam's folder of layer CSVs under log/
    tps: dict[str, TpsValue]  # every moqui_tps.in key but GPUID, with this machine's paths
    grid: PhantomGrid
    dose_name: str  # the engine's output file in OutputDir
    input_hash: str

    @property
    def label(self) -> str:
        return beam_label(self.beam_number, self.beam_name)

    @property
    def subject(self) -> str:
        return beam_subject(self.case_id, self.beam_number, self.beam_name)

    @property
    def dose_dir(self) -> Path:
        return Path(self.beam_dir) / "dose"

    @property
    def dose_file(self) -> Path:
        return self.dose_dir / self.dose_name

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
    engine_log: str
    engine_command: list[str]
    host: str
    gpu: int
    attempts: int
    started: float
    ended: float
    backend: str = "local"
    job_dir: str = ""


def engine_input_files(csv_dir: Path, csv_dir_name: str) -> list[Path]:
    """Every file the engine reads for a beam besides moqui_tps.in: the plan copy and its layer CSVs."""
    return sorted(p for p in (csv_dir / "plan").glob("*") if p.is_file()) + sorted(
        (csv_dir / "log" / csv_dir_name).glob("*.csv")
    )


def input_hash(tps_text: str, csv_dir: Path, csv_dir_name: str) -> str:
    """sha256 over the tps text (without GPUID), the plan copy and the beam's layer CSVs."""
    digest = hashlib.sha256(tps_text.encode())
    for path in engine_input_files(csv_dir, csv_dir_name):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()
