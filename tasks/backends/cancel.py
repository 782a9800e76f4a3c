"""A cancelled case run's engine jobs, stopped where a scheduler holds them (Slurm: scancel).

The worker that stops a cancelled run's process calls this: a Slurm job lives on in
the cluster after the process that submitted it is gone, and would hold its GPU for
nothing. Local and SSH jobs are left to their backends (Backend.stop_case).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from config import load_settings
from tasks.backends import make_backend
from tasks.backends.sshconn import SecretLookup


def stop_case_jobs(parameters: Mapping[str, object], secrets: SecretLookup | None = None) -> list[str]:
    """Stop the engine jobs of the case a process-case run was for; return the job ids stopped."""
    config = parameters.get("config")
    settings = load_settings(str(config) if config else None)
    case_id = Path(str(parameters["case_dir"])).name
    return make_backend(settings, secrets).stop_case(case_id)
