"""Validate an RTDOSE: read back with pydicom, then dicom3tools' dciodvfy (its `Error` lines)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tasks.dose.read import read_rtdose_header

_DCIODVFY_TIMEOUT_S = 600


def validate_rtdose(path: Path, validator: str | None = "dciodvfy") -> list[str]:
    """Problems with an RTDOSE file (pydicom read-back, then dciodvfy errors); empty if none.

    `validator` is the dciodvfy command (name or path); None, or a command that
    is not installed, skips it (the caller decides whether to warn).
    """
    path = Path(path)
    _, problems = read_rtdose_header(path)
    if problems or validator is None or not dciodvfy_available(validator):
        return problems
    return _dciodvfy_errors(validator, path)


def dciodvfy_available(validator: str = "dciodvfy") -> bool:
    """True if dicom3tools' IOD verifier can be run."""
    return shutil.which(validator) is not None


def _dciodvfy_errors(validator: str, path: Path) -> list[str]:
    """dciodvfy's `Error` lines for `path`; an abort (it asserts on 32-bit RTDOSE) is an error."""
    try:
        result = subprocess.run(
            [validator, str(path)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_DCIODVFY_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return [f"{path}: dciodvfy did not finish within {_DCIODVFY_TIMEOUT_S} s"]
    lines = (result.stdout + result.stderr).splitlines()
    errors = [f"{path}: {line.strip()}" for line in lines if line.startswith("Error")]
    if result.returncode < 0 or (result.returncode and not errors):
        tail = " | ".join(line.strip() for line in lines[-3:])
        errors.append(f"{path}: dciodvfy failed (exit code {result.returncode}): {tail}")
    return errors
