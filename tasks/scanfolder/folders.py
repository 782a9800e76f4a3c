"""The case folders of a scan folder: its subfolders and those of its room folders (G1/, G2/).

A folder that must not be run at all (it cannot be listed, it is a symbolic link leading
out of the scan folder, its name cannot name a case) is left out with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.casefolder import Inspection
from tasks.casefolder.names import is_partial, name_problem


@dataclass(frozen=True)
class CaseFolder:
    """A case folder found in the scan folder."""

    path: Path
    name: str  # relative to the scan folder, e.g. "G2/12345678"
    room_folder: str | None  # the room subfolder it sits in, if any

    @property
    def case_id(self) -> str:
        return self.path.name


def shown(path: Path) -> str:
    """A path as text that can be logged and sent to the server, even if its bytes are not UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def unreadable(folder: Path, error: OSError) -> str:
    """Why `folder` cannot be read, naming the file or subfolder at fault."""
    inner = os.path.relpath(error.filename, folder) if isinstance(error.filename, str) else "."
    where = "" if inner == "." else f"{shown(Path(inner))!r} "
    return f"cannot read {where}({error.strerror or error})"


def _subfolders(folder: Path, root: Path, skipped: dict[Path, str]) -> list[str]:
    """Names of the subfolders of `folder`; a symbolic link leading outside `root` goes to `skipped`."""
    names = []
    with os.scandir(folder) as listing:
        for entry in listing:
            if is_partial(entry.name) or not entry.is_dir():
                continue
            if entry.is_symlink() and not Path(os.path.realpath(entry.path)).is_relative_to(root):
                target = shown(Path(os.readlink(entry.path)))
                skipped[Path(entry.path)] = (
                    f"symbolic link to {target!r} leads outside the scan folder; not followed"
                )
                continue
            names.append(entry.name)
    return sorted(names)


def case_folders(scan_dir: Path, room_folders: list[str], skipped: dict[Path, str]) -> Iterator[CaseFolder]:
    """Every case folder: the scan folder's subfolders, and those of its room folders (G1/, G2/).

    Left out, with the reason in `skipped`: a folder that cannot be listed, a symbolic
    link leading outside the scan folder (its files are not the scan folder's to read),
    and a folder whose name cannot name a case (casefolder.name_problem). A scan folder
    that cannot be listed raises OSError (nothing can be watched).
    """
    root = Path(os.path.realpath(scan_dir))
    rooms = set(room_folders)
    for name in _subfolders(scan_dir, root, skipped):
        if name in rooms:
            try:
                inner = [(f"{name}/{case}", case) for case in _subfolders(scan_dir / name, root, skipped)]
            except OSError as error:
                skipped[scan_dir / name] = unreadable(scan_dir / name, error)
                continue
        else:
            inner = [(name, name)]
        for relative, case in inner:
            reason = name_problem(case)
            if reason is None:
                yield CaseFolder(scan_dir / relative, relative, name if name in rooms else None)
            else:
                skipped[scan_dir / relative] = reason


def room_tag(folder: CaseFolder, inspection: Inspection) -> str | None:
    """The gantry room as a run tag: from the plan's machine when readable, else the room folder."""
    if inspection.case is not None and inspection.case.room is not None:
        return f"room:G{inspection.case.room}"
    return f"room:{folder.room_folder}" if folder.room_folder else None
