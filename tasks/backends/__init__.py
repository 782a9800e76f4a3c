"""Where beams' engines run: `backend.kind` picks one (this machine, a GPU host over SSH, or Slurm jobs).

`base` holds the job record every backend shares (the wrapper, launch and probe scripts,
following a job); `adopt` decides, for one beam, whether its job is adopted, collected
or launched, and judges the result.
"""

from __future__ import annotations

from config.settings import Settings
from tasks.backends.base import Backend, Followed, Job, JobState, follow
from tasks.backends.local import LocalBackend
from tasks.backends.slurm import SlurmLocalBackend, SlurmSshBackend
from tasks.backends.ssh import SshBackend
from tasks.backends.sshconn import SecretLookup

__all__ = ["Backend", "Followed", "Job", "JobState", "follow", "make_backend"]


def make_backend(settings: Settings, secrets: SecretLookup | None = None) -> Backend:
    """The configured backend (SSH backends share one connection per host in this process).

    `secrets` reads a named secret (a Prefect Secret block) for an SSH key's passphrase.
    """
    if settings.backend.kind == "slurm":  # Slurm commands here, or on the login node of the ssh: section
        return SlurmSshBackend(settings, secrets) if settings.ssh else SlurmLocalBackend(settings)
    if settings.backend.kind == "ssh":
        return SshBackend(settings, secrets)
    return LocalBackend(settings)
