"""What a case folder holds, as the sensor sees it: its files, its content key, its cheap signature.

A case is named by a key computed from what is on disk: its path under the scan folder
and every file's relative path, size and mtime. The same content always gives the same
key, whatever file events, rescans or restarts happen, and a changed folder gets a new
key. Nothing here writes to the scan folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from tasks.casefolder.names import is_partial

KEY_VERSION = b"mqi-case-key-1"


@dataclass(frozen=True)
class FileEntry:
    """One file of a case folder as the key sees it."""

    path: str  # relative to the case folder, '/'-separated
    size: int
    mtime_ns: int
    partial: bool  # a transfer still in progress (casefolder.is_partial on any part of the path)


def list_files(case_dir: Path) -> list[FileEntry]:
    """Every file under `case_dir`, sorted; a file that vanishes while listed is left out.

    Symbolic links are not followed (their own size and mtime count), so a link loop
    cannot hang the sensor nor a link out of the folder make it read elsewhere.
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
            except FileNotFoundError:  # removed or renamed while we listed: the next scan sees the result
                continue
            entries.append(FileEntry(relative, stat.st_size, stat.st_mtime_ns, inside_partial))

    walk(case_dir, "", False)
    return entries


def case_key(name: str, files: list[FileEntry], ready_marker: str) -> str:
    """sha256 over the case's name under the scan folder and each complete file's path, size, mtime.

    Partial files are left out (they are renamed when complete, which changes the key
    anyway), and so is the ready marker: touching it again is not new content.
    """
    digest = hashlib.sha256(KEY_VERSION + b"\0" + name.encode("utf-8", "surrogateescape") + b"\0")
    for entry in files:
        if entry.partial or entry.path == ready_marker:
            continue
        digest.update(f"{entry.path}\0{entry.size}\0{entry.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


Signature = tuple[tuple[str, int], ...]


def folder_signature(case_dir: Path) -> Signature:
    """The case folder's entry count and the timestamps of it and its subfolders: cheap every poll.

    Adding, removing or renaming a file changes its folder's timestamp, so an unchanged
    signature means no file appeared or vanished there (the count catches a marker added
    within the timestamp resolution of coarse file systems); files rewritten in place are
    found by the periodic full rescan instead.
    """
    parts = [(".", case_dir.stat().st_mtime_ns)]
    with os.scandir(case_dir) as listing:
        entries = list(listing)
    parts.append(("#", len(entries)))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            parts.append((entry.name, entry.stat(follow_symlinks=False).st_mtime_ns))
    return tuple(sorted(parts))
