"""What a case folder holds, file by file, and whether it still holds what discovery read.

A run reads the case folder at discovery, again when the interpreter's input is staged,
and relies on it until the last beam is launched. A folder renamed, removed or changed
under a run (a re-transfer, a second fraction copied in) must stop the run before the
next GPU time is spent on inputs that are no longer the case's. So discovery records
the folder's files (path, size, mtime) and a key over them, and `check_unchanged`
compares the folder with that record. The sensor's content key (tasks/scanfolder) is made
from the same listing. Nothing here writes to the case folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.casefolder.names import is_partial
from tasks.common.errors import PermanentError

CONTENT_KEY_VERSION = b"mqi-case-content-1"
CHANGES_SHOWN = 5  # paths named per kind of change in a message


@dataclass(frozen=True)
class FileEntry:
    """One file of a case folder as the content keys see it."""

    path: str  # relative to the case folder, '/'-separated
    size: int
    mtime_ns: int
    partial: bool  # a transfer still in progress (casefolder.is_partial on any part of the path)


def list_files(case_dir: Path) -> list[FileEntry]:
    """Every file under `case_dir`, sorted; a file that vanishes while listed is left out.

    Symbolic links are not followed (their own size and mtime count), so a link loop
    cannot hang the listing nor a link out of the folder make it read elsewhere.
    """
    entries: list[FileEntry] = []

    def walk(folder: Path, prefix: str, partial: bool) -> None:
        with os.scandir(folder) as listing:
            children = sorted(listing, key=lambda entry: entry.name)
        for entry in children:
            relative = f"{prefix}{entry.name}"
            inside_partial = partial or is_partial(entry.name)
            try:
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), f"{relative}/", inside_partial)
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed or renamed while we listed: the next listing sees the result
                continue
            entries.append(FileEntry(relative, stat.st_size, stat.st_mtime_ns, inside_partial))

    walk(case_dir, "", False)
    return entries


def counted(files: list[FileEntry], ready_marker: str) -> list[FileEntry]:
    """The files that make a case's content: partial transfers and the ready marker left out.

    Partial files are renamed when complete (which changes the content anyway), and
    touching the marker again is not new content.
    """
    return [entry for entry in files if not entry.partial and entry.path != ready_marker]


def files_digest(header: bytes, files: list[FileEntry], ready_marker: str) -> str:
    """sha256 over `header` and each counted file's path, size and mtime."""
    digest = hashlib.sha256(header)
    for entry in counted(files, ready_marker):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


class CaseContent(BaseModel):
    """A case folder's files as discovery read them, and their key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str
    case_dir: str
    ready_marker: str
    files: tuple[FileEntry, ...]
    key: str

    @classmethod
    def of(cls, case_id: str, case_dir: Path, files: list[FileEntry], ready_marker: str) -> CaseContent:
        return cls(
            case_id=case_id,
            case_dir=str(case_dir),
            ready_marker=ready_marker,
            files=tuple(counted(files, ready_marker)),
            key=content_key(files, ready_marker),
        )


def content_key(files: list[FileEntry], ready_marker: str) -> str:
    """The key of a case folder's content, wherever the folder is (its name is not part of it)."""
    return files_digest(CONTENT_KEY_VERSION + b"\0", files, ready_marker)


def describe_changes(before: list[FileEntry], after: list[FileEntry]) -> str:
    """'added a, b; removed c; changed d' between two listings of counted files ('' if none)."""
    old = {entry.path: entry for entry in before}
    new = {entry.path: entry for entry in after}
    kinds = [
        ("added", sorted(new.keys() - old.keys())),
        ("removed", sorted(old.keys() - new.keys())),
        ("changed", sorted(path for path in old.keys() & new.keys() if old[path] != new[path])),
    ]
    parts = []
    for kind, paths in kinds:
        if paths:
            shown = ", ".join(paths[:CHANGES_SHOWN])
            more = len(paths) - CHANGES_SHOWN
            parts.append(f"{kind} {shown}" + (f" and {more} more" if more > 0 else ""))
    return "; ".join(parts)


def check_unchanged(content: CaseContent) -> None:
    """PermanentError, naming the case and what changed, unless its folder holds what discovery read."""
    case_dir = Path(content.case_dir)
    try:
        now = list_files(case_dir)
    except FileNotFoundError:
        raise PermanentError(
            f"case {content.case_id}: the case folder {case_dir} is gone (renamed, moved or removed) "
            "since discovery",
            "the case folder is gone since discovery",
        ) from None
    except OSError as error:
        raise PermanentError(
            f"case {content.case_id}: the case folder {case_dir} cannot be read any more "
            f"({error.strerror}: {error.filename})",
            f"the case folder cannot be read any more ({error.strerror})",
        ) from None
    if content_key(now, content.ready_marker) != content.key:
        changes = describe_changes(list(content.files), counted(now, content.ready_marker))
        raise PermanentError(
            f"case {content.case_id}: the case folder {case_dir} changed since discovery ({changes}); "
            "its run stops: what it read is no longer the case",
            f"the case folder changed since discovery ({changes})",
        )
