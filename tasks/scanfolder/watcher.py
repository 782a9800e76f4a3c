"""When a case folder in the scan folder is ready to run: the sensor's decisions, without Prefect.

Readiness: the ready marker (or, where configured, a quiet period), partial transfers
ignored, and a case that looks half copied (empty, no RTPLAN yet, machine logs without
their PlanInfo.txt, fewer delivery folders than treatment beams), or whose files still
change after the marker, waits and is reported, never run half. Two folders with
one case id are skipped with the reason. The sensor flow adds the Prefect side (runs,
events, logs). Nothing here writes to the scan folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from config.settings import Settings
from tasks.casefolder import Inspection, inspect_case
from tasks.scanfolder.contents import FileEntry, Signature, case_key, folder_signature, list_files
from tasks.scanfolder.folders import CaseFolder, case_folders, unreadable


@dataclass(frozen=True)
class ReadyCase:
    """A case folder that is ready, with a key no decision has been made for yet."""

    folder: CaseFolder
    key: str
    files: int
    by: Literal["marker", "quiet period"]


Verdict = Literal["run", "wait", "report"]
CHANGED_FILES_SHOWN = 5  # in a report of files still changing after the marker


@dataclass(frozen=True)
class Waiting:
    """Why a ready case is not run yet: what the physicist reads, and the event's payload."""

    kind: Literal["changing", "incomplete"]
    text: str
    details: dict[str, object]


@dataclass
class _Tracked:
    signature: Signature = ()
    files: list[FileEntry] = field(default_factory=list)
    key: str = ""
    changed_at: float = 0.0  # the poll that found the file list changed (the quiet period, settling)
    listed_at: float = 0.0  # the poll that last read the file list
    changed: list[str] = field(default_factory=list)  # the paths that changed then
    settled_key: str | None = None  # the content a run exists for
    inspection: Inspection | None = None  # of `inspected_key`
    inspected_key: str | None = None
    waiting: str | None = None  # the Waiting.kind of the current wait
    waiting_since: float = 0.0
    reported: bool = False  # the current wait was reported


def _changed_paths(before: list[FileEntry], after: list[FileEntry], marker: str) -> list[str]:
    """Paths added, removed or rewritten between two listings, the ready marker left out."""
    return sorted({entry.path for entry in set(before) ^ set(after)} - {marker})


def _incomplete(inspection: Inspection) -> Waiting | None:
    """Why a ready folder looks half copied (files still arriving, fewer delivery folders than beams).

    A marker written before the files must not start a run that fails at discovery, and
    then another one after every pause of the copy.
    """
    reasons = inspection.incomplete_reasons()
    if not reasons:
        return None
    return Waiting(
        "incomplete",
        "; ".join(reasons),
        {"missing_beams": inspection.missing_deliveries, "arriving": inspection.arriving},
    )


class CaseWatcher:
    """Tracks the case folders of the scan folder between polls; decides what is ready.

    `ready_cases()` returns the ready folders whose current content has no run yet;
    the caller settles each one that has (or now got) a run, and asks `verdict()` for
    the others. Cheap on a quiet scan folder: only folder timestamps are read, except
    for unsettled ready cases and every `rescan_seconds`.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.scan_dir = settings.scan_dir
        self._clock = clock
        self._cases: dict[Path, _Tracked] = {}
        self._next_rescan = 0.0
        self.skipped: dict[Path, str] = {}  # folders not considered in the last poll, and why

    def ready_cases(self) -> list[ReadyCase]:
        """Scan once. A folder that cannot be read or must not run is recorded in `skipped`, never raised.

        Two folders with one case id (e.g. G1/P1 and G2/P1) are both skipped while both
        exist: their runs would share the case's work and output folders.
        Raises OSError only when the scan folder itself cannot be listed.
        """
        now = self._clock()
        full = now >= self._next_rescan
        if full:
            self._next_rescan = now + self.settings.sensor.rescan_seconds
        ready = []
        self.skipped = {}
        folders = list(case_folders(self.scan_dir, self.settings.sensor.room_folders, self.skipped))
        claims: dict[str, list[str]] = {}
        for folder in folders:
            claims.setdefault(folder.case_id, []).append(folder.name)
        for folder in folders:
            others = [name for name in claims[folder.case_id] if name != folder.name]
            if others:
                self.skipped[folder.path] = (
                    f"case id {folder.case_id!r} is also claimed by {', '.join(others)}: runs of one "
                    "case id would share its work and output folders; rename or remove all but one"
                )
                continue
            try:
                found = self._check(folder, now, full)
            except OSError as error:  # vanished, locked, permission denied: try again next poll
                self.skipped[folder.path] = unreadable(folder.path, error)
                continue
            if found is not None:
                ready.append(found)
        for gone in set(self._cases) - {folder.path for folder in folders}:
            del self._cases[gone]
        return ready

    def _check(self, folder: CaseFolder, now: float, full: bool) -> ReadyCase | None:
        tracked = self._cases.setdefault(folder.path, _Tracked())
        quiet = self.settings.sensor.quiet_seconds
        marker = self.settings.case.ready_marker
        signature = folder_signature(folder.path)
        # A case that may be ready but has no run yet is re-read every poll: a file still
        # growing after the marker changes no folder timestamp.
        waiting = tracked.key != tracked.settled_key and (
            quiet is not None or any(entry.path == marker for entry in tracked.files)
        )
        if full or signature != tracked.signature or not tracked.key or waiting:
            files = list_files(folder.path)
            tracked.listed_at = now
            if files != tracked.files or not tracked.key:
                tracked.changed = _changed_paths(tracked.files, files, marker)
                tracked.files = files
                tracked.key = case_key(folder.name, files, marker)
                tracked.changed_at = now
            tracked.signature = signature
        if tracked.key == tracked.settled_key:
            return None
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
            tracked.waiting = None

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

    def waiting(self, case: ReadyCase) -> Waiting | None:
        """Why `case` must not run yet; None when it may.

        Files changed within `settle_seconds` before the last listing (a marker does not
        prove the copy has ended; measured between listings, so a slow poll cannot make a
        growing case look settled), or the folder looks incomplete (see `_incomplete`).
        """
        tracked = self._cases[case.folder.path]
        if tracked.listed_at - tracked.changed_at < self.settings.sensor.settle_seconds:
            shown_paths = tracked.changed[:CHANGED_FILES_SHOWN]
            more = len(tracked.changed) - len(shown_paths)
            text = ", ".join(shown_paths) + (f" and {more} more" if more > 0 else "")
            return Waiting("changing", f"its files are still changing ({text})", {"changed": shown_paths})
        return _incomplete(self.inspection(case))

    def verdict(self, case: ReadyCase) -> Verdict:
        """run it; wait (see `waiting`); or report that it still waits.

        A folder with other problems runs: its run fails at discovery with every problem
        listed, which is where the physicist looks. "report" comes once per wait, after
        waiting for the same reason `settle_seconds` + `incomplete_report_seconds` (so a
        case that merely settles is never reported as changing).
        """
        tracked = self._cases[case.folder.path]
        waiting = self.waiting(case)
        if waiting is None:
            return "run"
        now = self._clock()
        if tracked.waiting != waiting.kind:
            tracked.waiting, tracked.waiting_since, tracked.reported = waiting.kind, now, False
        patience = self.settings.sensor.settle_seconds + self.settings.sensor.incomplete_report_seconds
        if tracked.reported or now - tracked.waiting_since < patience:
            return "wait"
        tracked.reported = True
        return "report"
