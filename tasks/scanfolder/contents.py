"""What a case folder holds, as the sensor sees it: its files, its content key, its cheap signature.

A case is named by a key computed from what is on disk: its path under the scan folder
and every file's relative path, size and mtime. The same content always gives the same
key, whatever file events, rescans or restarts happen, and a changed folder gets a new
key. Nothing here writes to the scan folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.casefolder.content import FileEntry, files_digest, list_files

__all__ = ["FileEntry", "Signature", "case_key", "folder_signature", "list_files"]

KEY_VERSION = b"mqi-case-key-1"


def case_key(name: str, files: list[FileEntry], ready_marker: str) -> str:
    """sha256 over the case's name under the scan folder and each counted file's path, size, mtime.

    Partial files and the ready marker are left out (tasks/casefolder/content.py: counted).
    """
    return files_digest(
        KEY_VERSION + b"\0" + name.encode("utf-8", "surrogateescape") + b"\0", files, ready_marker
    )


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
