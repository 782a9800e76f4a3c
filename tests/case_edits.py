"""Test helpers that edit a sample case folder, and a fingerprint of a folder tree.

Shared by the discovery tests and the bad-input corpus (tests/bad_cases.py), so a case
is broken the same way everywhere.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple


def deliveries(case_dir: Path) -> dict[int, list[Path]]:
    """Delivery folders per DICOM_BEAM_NUMBER, earliest first (folder names are irradiation times)."""
    by_beam: dict[int, list[Path]] = {}
    for info in sorted(case_dir.glob("*/PlanInfo.txt")):
        values = dict(line.split(",", 1) for line in info.read_text().splitlines())
        by_beam.setdefault(int(values["DICOM_BEAM_NUMBER"]), []).append(info.parent)
    return by_beam


def delivery_of(case_dir: Path, beam_number: int) -> Path:
    return deliveries(case_dir)[beam_number][0]


def set_planinfo(folder: Path, key: str, value: str) -> None:
    info = folder / "PlanInfo.txt"
    lines = [
        f"{key},{value}" if line.startswith(f"{key},") else line for line in info.read_text().split("\n")
    ]
    info.write_text("\n".join(lines))


def drop_last_layer_row(folder: Path) -> None:
    planrange = folder / "PlanRange.txt"
    planrange.write_text("\n".join(planrange.read_text().splitlines()[:-1]) + "\n")


def plan_file(case_dir: Path) -> Path:
    return next(case_dir.glob("RP.*.dcm"))


class Entry(NamedTuple):
    """One entry of a tree as lstat sees it; `content` is a file's sha256 or a link's target."""

    mode: int
    size: int
    mtime_ns: int
    content: str


def tree_state(root: Path) -> dict[str, Entry]:
    """Every entry under `root`, by relative path, without following links or opening pipes.

    Paths are kept as the file system has them (names that are not UTF-8 included). A
    file or folder this process may not read is recorded as such: what cannot be read
    cannot have been rewritten unseen without changing its size or mtime.
    """
    state: dict[str, Entry] = {}

    def visit(path: Path, relative: str) -> None:
        info = path.lstat()
        content = ""
        if stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            try:
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            except PermissionError:
                content = "unreadable"
        state[relative] = Entry(info.st_mode, info.st_size, info.st_mtime_ns, content)
        if stat.S_ISDIR(info.st_mode):
            try:
                names = sorted(os.listdir(path))
            except PermissionError:
                state[relative] = state[relative]._replace(content="unlistable")
                return
            for name in names:
                visit(path / name, f"{relative}/{name}")

    visit(root, ".")
    return state
