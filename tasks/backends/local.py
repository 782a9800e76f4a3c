"""The local backend: the GPU box is this machine.

The engine still runs as a detached job with a record (the same wrapper as
on a remote host), so a killed worker's engine keeps its GPU and is adopted
by the next run instead of started twice. Inputs and outputs are already
where the engine reads and writes them: nothing to stage or download; the
beam's moqui_tps.in is written in its job folder.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
from pathlib import Path

from tasks.backends.base import WRAPPER, WRAPPER_NAME, Backend, CommandResult, FetchError, Job, LaunchSpec
from tasks.common.errors import ToolError
from tasks.moqui.beam import TPS_NAME, BeamInput

COMMAND_TIMEOUT_SECONDS = 60.0


class LocalBackend(Backend):
    kind = "local"

    @property
    def where(self) -> str:
        return f"this machine ({socket.gethostname()})"

    @property
    def poll_seconds(self) -> float:
        return self.settings.engine.poll_seconds

    def run(self, script: str, timeout: float | None = None) -> CommandResult:
        try:
            done = subprocess.run(
                ["sh", "-c", script],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=timeout or COMMAND_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            raise ToolError(
                f"a job command did not finish within {timeout or COMMAND_TIMEOUT_SECONDS:g} s"
            ) from None
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def job_dir(self, beam: BeamInput) -> str:
        return str(Path(beam.beam_dir) / "jobs" / beam.input_hash)

    def case_jobs_pattern(self, case_id: str) -> str:
        return f"{shlex.quote(str(self.settings.work_dir(case_id) / 'beams'))}/beam-*/jobs/*"

    def stage(self, beam: BeamInput) -> None:
        """The wrapper in the job folder; the staged input is already where the engine reads it.

        The stand-in engine's default folder lives under the data root: a fresh data root gets it.
        """
        job_dir = Path(self.job_dir(beam))
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / WRAPPER_NAME).write_bytes(WRAPPER)
        if self.settings.engine_dir.is_relative_to(self.settings.root):
            self.settings.engine_dir.mkdir(parents=True, exist_ok=True)

    def input_path(self, beam: BeamInput) -> str:
        return str(Path(self.job_dir(beam)) / TPS_NAME)

    @property
    def engine_command(self) -> list[str]:
        return self.settings.engine.command

    def prepare_launch(self, beam: BeamInput, gpu: int, argv: list[str]) -> LaunchSpec:
        Path(self.input_path(beam)).write_text(beam.tps_text(gpu), encoding="utf-8")
        return LaunchSpec(
            argv=argv,
            engine_dir=str(self.settings.engine_dir),
            engine_dir_key="engine.workdir",
            lock_dir=str(self.settings.root / "gpu-locks"),
            fresh_dirs=[str(beam.dose_dir)],  # never mistake an earlier run's dose for this one's
        )

    def fetch(self, beam: BeamInput, job: Job) -> Path:
        """Nothing to move: the engine wrote into beam.dose_dir itself; find its one dose file."""
        found = sorted(path.name for path in beam.dose_dir.glob("*")) if beam.dose_dir.is_dir() else []
        name = beam.dose_match(found)
        if name is None:
            raise FetchError(
                f"{beam.subject}: engine wrote no single dose file {beam.dose_name} in {beam.dose_dir} "
                f"(found: {', '.join(found) or 'nothing'})"
            )
        return beam.dose_dir / name

    def cleanup(self, beam: BeamInput, job: Job) -> None:
        """The job folder holds only its small record: kept as history, marked collected."""
        self.mark_collected(job)
