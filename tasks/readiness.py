"""When a case folder in the scan folder is ready to run, and the key that names its content.

The old orchestrator queued a case twice on duplicate file events and lost track of
cases across restarts. Here a case is named by a key computed from what is on disk:
its path under the scan folder and every file's relative path, size and mtime. The same
content always gives the same key, whatever events, rescans or restarts happen, and a
changed folder gets a new key. Readiness follows DOMAIN.md: the ready marker (or, where
configured, a quiet period), partial transfers ignored, and a case with fewer delivery
folders than treatment beams waits and is reported, never run half.

Plain code, no Prefect: the sensor flow adds the Prefect side (runs, events, logs).
Nothing here writes to the scan folder.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from config.settings import Settings
from tasks.casefolder import Inspection, inspect_case, is_partial

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

    Symlinked folders are not followed, so a link loop cannot hang the sensor.
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
                stat = entry.stat()
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


@dataclass(frozen=True)
class CaseFolder:
    """A case folder found in the scan folder."""

    path: Path
    name: str  # relative to the scan folder, e.g. "G2/12345678"
    room_folder: str | None  # the room subfolder it sits in, if any

    @property
    def case_id(self) -> str:
        return self.path.name


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as listing:
        return sorted(entry.name for entry in listing if entry.is_dir() and not is_partial(entry.name))


def case_folders(
    scan_dir: Path, room_folders: list[str], unreadable: dict[Path, str]
) -> Iterator[CaseFolder]:
    """Every case folder: the scan folder's subfolders, and those of its room folders (G1/, G2/).

    A room folder that cannot be listed is recorded in `unreadable` and skipped; a scan
    folder that cannot be listed raises OSError (nothing can be watched).
    """
    rooms = set(room_folders)
    for name in _subfolders(scan_dir):
        if name not in rooms:
            yield CaseFolder(scan_dir / name, name, None)
            continue
        try:
            inner = _subfolders(scan_dir / name)
        except OSError as error:
            unreadable[scan_dir / name] = f"cannot list room folder ({error.strerror or error})"
            continue
        for case in inner:
            yield CaseFolder(scan_dir / name / case, f"{name}/{case}", name)


@dataclass(frozen=True)
class ReadyCase:
    """A case folder that is ready, with a key no decision has been made for yet."""

    folder: CaseFolder
    key: str
    files: int
    by: Literal["marker", "quiet period"]


Verdict = Literal["run", "wait", "report"]


@dataclass
class _Tracked:
    signature: Signature = ()
    files: list[FileEntry] = field(default_factory=list)
    key: str = ""
    changed_at: float = 0.0  # when the file list last changed (the quiet period)
    settled_key: str | None = None  # the content a run exists for
    inspection: Inspection | None = None  # of `inspected_key`
    inspected_key: str | None = None
    incomplete_since: float | None = None
    reported: bool = False


class CaseWatcher:
    """Tracks the case folders of the scan folder between polls; decides what is ready.

    `ready_cases()` returns the ready folders whose current content has no run yet;
    the caller settles each one that has (or now got) a run, and asks `verdict()` for
    the others. Cheap on a quiet scan folder: only folder timestamps are read, except
    for unsettled cases and every `rescan_seconds`.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.scan_dir = settings.scan_dir
        self._clock = clock
        self._cases: dict[Path, _Tracked] = {}
        self._next_rescan = 0.0
        self.unreadable: dict[Path, str] = {}  # folders that could not be read in the last poll, and why

    def ready_cases(self) -> list[ReadyCase]:
        """Scan once. A case folder that cannot be read is recorded in `unreadable`, never raised.

        Raises OSError only when the scan folder itself cannot be listed.
        """
        now = self._clock()
        full = now >= self._next_rescan
        if full:
            self._next_rescan = now + self.settings.sensor.rescan_seconds
        ready = []
        present = set()
        self.unreadable = {}
        for folder in case_folders(self.scan_dir, self.settings.sensor.room_folders, self.unreadable):
            present.add(folder.path)
            try:
                found = self._check(folder, now, full)
            except OSError as error:  # vanished, locked, permission denied: try again next poll
                self.unreadable[folder.path] = f"cannot read ({error.strerror or error})"
                continue
            if found is not None:
                ready.append(found)
        for gone in set(self._cases) - present:
            del self._cases[gone]
        return ready

    def _check(self, folder: CaseFolder, now: float, full: bool) -> ReadyCase | None:
        tracked = self._cases.setdefault(folder.path, _Tracked())
        quiet = self.settings.sensor.quiet_seconds
        signature = folder_signature(folder.path)
        settled = bool(tracked.key) and tracked.key == tracked.settled_key
        if full or signature != tracked.signature or not tracked.key or (quiet is not None and not settled):
            files = list_files(folder.path)
            if files != tracked.files or not tracked.key:
                tracked.files = files
                tracked.key = case_key(folder.name, files, self.settings.case.ready_marker)
                tracked.changed_at = now
            tracked.signature = signature
        if tracked.key == tracked.settled_key:
            return None
        marker = self.settings.case.ready_marker
        if any(entry.path == marker for entry in tracked.files):
            by: Literal["marker", "quiet period"] = "marker"
        elif quiet is not None and tracked.files and now - tracked.changed_at >= quiet:
            by = "quiet period"
        else:
            return None
        complete = sum(not entry.partial for entry in tracked.files)
        return ReadyCase(folder, tracked.key, complete, by)

    def settle(self, case: ReadyCase) -> None:
        """`case`'s content has a run: nothing more to do until the folder changes."""
        tracked = self._cases.get(case.folder.path)
        if tracked is not None and tracked.key == case.key:
            tracked.settled_key = case.key
            tracked.incomplete_since = None
            tracked.reported = False

    def inspection(self, case: ReadyCase) -> Inspection:
        """The folder inspected once per content (an incomplete case waits without re-reading its DICOM)."""
        tracked = self._cases[case.folder.path]
        if tracked.inspected_key != case.key or tracked.inspection is None:
            tracked.inspection = inspect_case(
                case.folder.path,
                ready_marker=self.settings.case.ready_marker,
                delivery_policy=self.settings.case.delivery_policy,
            )
            tracked.inspected_key = case.key
        return tracked.inspection

    def verdict(self, case: ReadyCase) -> Verdict:
        """run it; wait (fewer delivery folders than treatment beams); or report that it still waits.

        A folder with other problems runs: its run fails at discovery with every problem
        listed, which is where the physicist looks. "report" comes once per wait, after
        `incomplete_report_seconds`.
        """
        tracked = self._cases[case.folder.path]
        if not self.inspection(case).missing_deliveries:
            return "run"
        now = self._clock()
        if tracked.incomplete_since is None:
            tracked.incomplete_since = now
        waited = now - tracked.incomplete_since
        if tracked.reported or waited < self.settings.sensor.incomplete_report_seconds:
            return "wait"
        tracked.reported = True
        return "report"


def room_tag(folder: CaseFolder, inspection: Inspection) -> str | None:
    """The gantry room as a run tag: from the plan's machine when readable, else the room folder."""
    if inspection.case is not None and inspection.case.room is not None:
        return f"room:G{inspection.case.room}"
    return f"room:{folder.room_folder}" if folder.room_folder else None
