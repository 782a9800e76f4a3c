"""Where beams' engines run: `backend.kind` picks one (local today, ssh now, slurm later)."""

from __future__ import annotations

from config.settings import Settings
from tasks.backends.base import Backend, Followed, Job, JobState, follow
from tasks.backends.local import LocalBackend
from tasks.backends.ssh import SshBackend

__all__ = ["Backend", "Followed", "Job", "JobState", "follow", "make_backend"]


def make_backend(settings: Settings) -> Backend:
    """The configured backend (SSH backends share one connection per host in this process)."""
    if settings.backend.kind == "ssh":
        return SshBackend(settings)
    return LocalBackend(settings)
