"""The local backend: the GPU box is this machine.

The engine still runs as a detached job with a record (the same wrapper as
on a remote host), so a killed worker's engine keeps its GPU and is adopted
by the next run instead of started twice. Inputs and outputs are already
where the engine reads and writes them: nothing to stage or download; the
beam's moqui_tps.in is written in its job folder.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tasks.backends.base import WRAPPER, WRAPPER_NAME, Backend, CommandResult, Job, LaunchSpec
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

    def stage(self, beam: BeamInput) -> None:
        job_dir = Path(self.job_dir(beam))
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / WRAPPER_NAME).write_bytes(WRAPPER)

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
            clear=[str(beam.dose_file)],  # never mistake an earlier attempt's dose for this one's
        )

    def fetch(self, beam: BeamInput, job: Job) -> None:
        """Nothing to move: the engine wrote beam.dose_file itself (verify_dose checks it)."""

    def cleanup(self, beam: BeamInput, job: Job) -> None:
        """The job folder holds only its small record: kept as history, marked collected."""
        self.mark_collected(job)
