"""Names and entries of a case folder that are safe to use: what discovery may read, and how.

A case id becomes a run name, a log line and a folder; a file in a case folder may be a
transfer still in progress, a symbolic link leading elsewhere or a device that blocks
when read. These rules decide, before anything is opened.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from pathlib import Path

# Files still being written by the transfer service (and rsync's hidden temporaries).
PARTIAL_SUFFIXES = (".extracting", ".tmp", ".part", ".partial")


def csv_dir_name(beam_name: str) -> str:
    """The interpreter's folder name for a beam: every character but A-Z, a-z, 0-9, '_' and '-'
    becomes '_' (mqi_interpreter's moqui_generator, read from its source): `1G180:TX` -> `1G180_TX`."""
    return re.sub(r"[^a-zA-Z0-9_\-]", "_", beam_name)


def is_partial(name: str) -> bool:
    """Whether a file or folder name belongs to a transfer still in progress."""
    return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def name_problem(name: str) -> str | None:
    """Why a folder name cannot name a case, if it cannot.

    A case id becomes a run name, a log line, a folder on the output share and a JSON
    string on the Prefect server: bytes that are not UTF-8 cannot be sent to the server,
    and a control character (a newline) splits log lines and cannot exist on a Windows
    share. Spaces, quotes, shell characters and other unicode are fine: no shell ever sees
    a name.
    """
    for char in name:
        if 0xDC80 <= ord(char) <= 0xDCFF:  # how Python keeps a byte that is not UTF-8
            return f"the folder name is not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x}); rename the folder"
        if unicodedata.category(char) == "Cc":
            return f"the folder name contains a control character (U+{ord(char):04X}); rename the folder"
    return None


def refusal(entry: Path, root: Path) -> str | None:
    """Why discovery must not open `entry`, if it must not.

    A symbolic link leading out of the case folder would read (and make the tools read)
    files that are not the case's; a named pipe or device blocks or never ends when read.
    """
    try:
        if entry.is_symlink():
            target = os.readlink(entry)
            if not Path(os.path.realpath(entry)).is_relative_to(root):
                return f"symbolic link to {target!r} leads outside the case folder; not followed"
            try:
                mode = entry.stat().st_mode
            except OSError as error:
                return f"symbolic link to {target!r} cannot be followed ({error.strerror})"
        else:
            mode = entry.lstat().st_mode
    except OSError as error:
        return f"cannot read ({error.strerror})"
    kind = next((kind for test, kind in _SPECIAL_FILES if test(mode)), None)
    return None if kind is None else f"is {kind}, not a regular file; not read"


def safe_listing(folder: Path, root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The entries of `folder` that are safe to read, partial transfers left out, in a stable
    order; and (entry, reason) for each one refused. `root` is the case folder's real path.
    """
    entries, refused = [], []
    for entry in sorted(entry for entry in folder.iterdir() if not is_partial(entry.name)):
        reason = refusal(entry, root)
        if reason is None:
            entries.append(entry)
        else:
            refused.append((entry, reason))
    return entries, refused
