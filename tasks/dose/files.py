"""Files that appear whole or not at all, hashed while written."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tasks.dose.model import RtDoseError


def write_and_hash(path: Path, blocks: Iterable[memoryview | np.ndarray]) -> str:
    """Write `blocks` to `path` and return their sha256, computed on the way (no re-read)."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for block in blocks:
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as bad:
        raise RtDoseError(f"{path}: cannot read: {bad.strerror}") from None


@contextmanager
def atomic(out_path: Path) -> Iterator[Path]:
    """A `<name>.part` path to write; it becomes `out_path` only if the block succeeds."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        yield tmp
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
