"""Readiness and case keys (tasks/scanfolder), on real folders with a fake clock: no server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from config import ConfigError, load_settings
from tasks.scanfolder import watcher as readiness
from tasks.scanfolder.contents import case_key, list_files
from tasks.scanfolder.folders import room_tag
from tasks.scanfolder.watcher import CaseWatcher
from tests.conftest import write_config
from tests.service_stack import small_case


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watcher_for(tmp_path: Path, **sensor: object) -> tuple[CaseWatcher, Clock, Path]:
    settings = load_settings(write_config(tmp_path, {"sensor": sensor}), env={})
    clock = Clock()
    return CaseWatcher(settings, clock=clock), clock, settings.scan_dir


def names(ready: list[readiness.ReadyCase]) -> list[str]:
    return [case.folder.name for case in ready]


def bump(path: Path, seconds: int = 5) -> None:
    """Rewrite a file in place with new content and a later mtime (its folder's timestamp stays)."""
    stat = path.stat()
    path.write_bytes(path.read_bytes() + b"\0")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def test_key_names_content_not_events(tmp_path):
    case = small_case(tmp_path, "K1", beams=2)
    files = list_files(case)
    key = case_key("K1", files, "_CASE_READY")
    assert key == case_key("K1", list_files(case), "_CASE_READY")
    assert key != case_key("G2/K1", files, "_CASE_READY")  # the folder's place is part of its identity
    (case / "_CASE_READY").touch()  # the marker written again
    (case / "extra.dcm.part").write_bytes(b"still copying")  # a transfer in progress
    assert case_key("K1", list_files(case), "_CASE_READY") == key
    assert [f.partial for f in list_files(case) if f.path.endswith(".part")] == [True]
    bump(case / "2025042401440800" / "L001.ptn")
    assert case_key("K1", list_files(case), "_CASE_READY") != key


def test_marker_case_is_ready_once_until_its_content_changes(tmp_path):
    watcher, clock, scan = watcher_for(tmp_path, rescan_seconds=60)
    small_case(scan, "NOMARK", beams=2, ready_marker=None)
    case = small_case(scan, "A", beams=2)
    [ready] = watcher.ready_cases()
    assert (ready.folder.name, ready.by, watcher.verdict(ready)) == ("A", "marker", "wait")  # settling
    clock.now += 1
    assert watcher.ready_cases() == [ready]  # not settled yet (no run): offered again
    assert watcher.verdict(ready) == "run"
    watcher.settle(ready)
    (case / "_CASE_READY").touch()
    (case / "x.part").write_bytes(b"")
    (case / "x.part").unlink()
    assert watcher.ready_cases() == []  # duplicate events, same content: nothing to do
    bump(case / "2025042401440800" / "L001.ptn")
    assert watcher.ready_cases() == []  # rewritten in place: invisible until the full rescan
    clock.now += 61
    [changed] = watcher.ready_cases()
    assert changed.folder.name == "A" and changed.key != ready.key
    (scan / "NOMARK" / "_CASE_READY").touch()
    assert names(watcher.ready_cases()) == ["A", "NOMARK"]


def test_quiet_period_makes_a_case_without_marker_ready(tmp_path):
    watcher, clock, scan = watcher_for(tmp_path, quiet_seconds=30)
    case = small_case(scan, "Q", beams=2, ready_marker=None)
    assert watcher.ready_cases() == []
    clock.now += 20
    bump(case / "2025042401440800" / "L002.ptn")  # still being written: the quiet period restarts
    assert watcher.ready_cases() == []
    clock.now += 25
    assert watcher.ready_cases() == []
    clock.now += 6
    [ready] = watcher.ready_cases()
    assert ready.by == "quiet period" and watcher.verdict(ready) == "run"


def test_fewer_delivery_folders_than_beams_waits_is_reported_once_then_runs(tmp_path):
    watcher, clock, scan = watcher_for(tmp_path, incomplete_report_seconds=100)
    case = small_case(scan, "HALF", beams=2)
    later = sorted(p for p in case.iterdir() if p.is_dir())[-1]
    held = shutil.move(later, tmp_path / "held")
    [ready] = watcher.ready_cases()
    assert watcher.waiting(ready).kind == "changing"  # just seen: settling first
    clock.now += 1
    assert watcher.ready_cases() == [ready]  # listed again: unchanged for a second
    assert watcher.verdict(ready) == "wait"
    assert watcher.waiting(ready).kind == "incomplete"
    assert watcher.inspection(ready).missing_deliveries == [3]
    clock.now += 99
    assert watcher.verdict(watcher.ready_cases()[0]) == "wait"
    clock.now += 2
    assert watcher.verdict(watcher.ready_cases()[0]) == "report"
    clock.now += 500
    assert watcher.verdict(watcher.ready_cases()[0]) == "wait"  # reported once
    shutil.move(held, later)
    [complete] = watcher.ready_cases()
    assert complete.key != ready.key and watcher.verdict(complete) == "wait"  # settling, not reported
    clock.now += 1
    assert watcher.verdict(watcher.ready_cases()[0]) == "run"


def test_room_folders_and_an_unreadable_case_do_not_stop_the_scan(tmp_path, monkeypatch):
    watcher, _, scan = watcher_for(tmp_path)
    small_case(scan / "G1", "R1", beams=2, machine="G1")
    small_case(scan / "G2", "BROKEN", beams=2)
    (scan / "G2" / "NOPLAN").mkdir()
    (scan / "G2" / "NOPLAN" / "_CASE_READY").touch()
    original = readiness.list_files

    def failing(case_dir: Path) -> list[readiness.FileEntry]:
        if case_dir.name == "BROKEN":
            raise PermissionError(13, "Permission denied", str(case_dir))
        return original(case_dir)

    monkeypatch.setattr(readiness, "list_files", failing)
    ready = watcher.ready_cases()
    assert names(ready) == ["G1/R1", "G2/NOPLAN"]
    assert watcher.skipped == {scan / "G2" / "BROKEN": "cannot read (Permission denied)"}
    tags = [room_tag(case.folder, watcher.inspection(case)) for case in ready]
    assert tags == ["room:G1", "room:G2"]  # from the plan; from the room folder when there is none
    assert watcher.inspection(ready[1]).problems  # runs anyway: its run fails at discovery, listing them


def test_sensor_settings_are_checked(tmp_path):
    bad = write_config(tmp_path, {"sensor": {"poll_secs": 1, "room_folders": ["a/b"]}})
    with pytest.raises(ConfigError) as error:
        load_settings(bad, env={})
    assert "sensor.poll_secs: unknown key" in str(error.value)
    assert "sensor.room_folders" in str(error.value)


def test_a_slow_poll_does_not_make_growing_files_look_settled(tmp_path):
    watcher, clock, scan = watcher_for(tmp_path)
    case = small_case(scan, "GROW")
    for _ in range(3):  # the marker is there, but the copy still appends to a log
        [ready] = watcher.ready_cases()
        clock.now += 5  # the server answered slowly between the listing and the verdict
        assert watcher.verdict(ready) == "wait"
        bump(case / "2025042401440800" / "L001.ptn")
    [ready] = watcher.ready_cases()  # the last change is seen here ...
    clock.now += 1
    assert watcher.verdict(watcher.ready_cases()[0]) == "run"  # ... and nothing since


def _copy_order(source: Path, plan_first: bool) -> list[Path]:
    """The files of `source` as a transfer that writes the marker first might copy them."""
    files = sorted(path for path in source.rglob("*") if path.is_file() and path.name != "_CASE_READY")
    plans = [path for path in files if path.parent == source]
    deliveries = [path for path in files if path.parent != source]
    return plans + deliveries if plan_first else deliveries + plans


@pytest.mark.parametrize("plan_first", [True, False], ids=["plan-first", "plan-last"])
def test_a_marker_written_before_the_files_waits_until_they_are_all_there(tmp_path, plan_first):
    """Issue 16: pauses longer than settle_seconds once gave 24 runs of one case, 19 failing at discovery."""
    watcher, clock, scan = watcher_for(tmp_path, settle_seconds=1, incomplete_report_seconds=1000)
    source = small_case(tmp_path / "source", "EARLY", beams=2)
    case = scan / "EARLY"
    case.mkdir(parents=True)
    (case / "_CASE_READY").touch()
    reasons: list[str] = []
    order = _copy_order(source, plan_first)
    for path in order:
        target = case / path.relative_to(source)
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(path, target)
        clock.now += 2  # a pause longer than settle_seconds
        [ready] = watcher.ready_cases()  # seen changed ...
        clock.now += 1
        [ready] = watcher.ready_cases()  # ... and settled
        verdict = watcher.verdict(ready)
        if path != order[-1]:
            assert verdict == "wait", (target.relative_to(case), watcher.inspection(ready).problems)
            reasons.append(watcher.waiting(ready).text)
    assert verdict == "run"
    watcher.settle(ready)
    assert watcher.ready_cases() == []
    assert any("has machine logs but no PlanInfo.txt yet" in reason for reason in reasons)
    assert any("has no PlanRange.txt yet" in reason for reason in reasons)
    assert any(("no RTPLAN yet" if not plan_first else "have no delivery folder") in r for r in reasons)


def test_an_empty_ready_folder_waits_and_is_reported_once(tmp_path):
    watcher, clock, scan = watcher_for(tmp_path, settle_seconds=1, incomplete_report_seconds=10)
    (scan / "EMPTY").mkdir(parents=True)
    (scan / "EMPTY" / "_CASE_READY").touch()
    verdicts = []
    for _ in range(40):
        [ready] = watcher.ready_cases()
        verdicts.append(watcher.verdict(ready))
        clock.now += 1
    assert "run" not in verdicts and verdicts.count("report") == 1
    assert watcher.waiting(ready).text == "the case folder is empty"
