"""The bad-input corpus (issue 6): every kind of bad case folder, and what it must produce.

Each entry builds its folder from a valid small sample case and breaks one thing. Its
level says who must catch it:

- "flow": the sensor starts a run, which ends in `state` (Failed, naming the case and
  the file or beam at fault; or Completed, for names the system handles safely);
- "sensor": no run is started; the sensor reports it once (log and the event `event`).

`expect` holds substrings that must all appear in the Failed state's message (for the
flow level) or in the sensor's report (for the sensor level). Builders write only under
the scan folder they are given, except a link target in `outside(scan)`, its sibling.

Names. A case id is untrusted text, but never reaches a shell: every tool
is started with an argument list and absolute paths. So names with spaces, quotes, `;`,
`$(...)`, backticks, unicode or a leading dash run like any other case (a clinic wants
its cases recalculated, not renamed); the shell-like ones carry a harmless `touch
INJECTED-...` that must never happen. A name with a control character (a newline) or
with bytes that are not UTF-8 is refused by the sensor before a run exists: it cannot
be sent to the server or live on a Windows share, and it would split every log line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydicom

from config import Settings, load_settings
from tasks.casefolder import inspect_case
from tasks.scanfolder.watcher import CaseWatcher
from tests.case_edits import delivery_of, drop_last_layer_row, plan_file, set_planinfo
from tests.service_stack import REPO_ROOT, small_case, without_privileges

INJECTED = "INJECTED"  # prefix of the files a hostile name would create if a shell ever ran it
PHOTON_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan (photons), not RT Ion Plan
DELIVERY = "2025042401440800"  # small_case's delivery folder of beam 2, its first treatment beam


def outside(scan: Path) -> Path:
    """A folder beside the scan folder, for link targets that must never be read."""
    folder = scan.parent / "outside"
    folder.mkdir(exist_ok=True)
    return folder


@dataclass(frozen=True)
class BadCase:
    """One kind of bad input and the outcome it must have."""

    kind: str
    build: Callable[[Path, str], Path]  # (scan folder, case id) -> the case folder
    level: Literal["flow", "sensor"]
    expect: tuple[str, ...]
    state: Literal["Failed", "Completed"] | None = None  # flow level
    event: str | None = None  # sensor level
    case_id: str = ""  # default: BAD-<kind>
    grow: Callable[[Path], None] | None = None  # called again and again while the sensor watches
    needs_permissions: bool = False  # file modes must bite (root bypasses them unless its caps are dropped)
    why: str = ""  # the decision, for kinds where "works" was an option

    def __post_init__(self) -> None:
        if not self.case_id:
            object.__setattr__(self, "case_id", f"BAD-{self.kind}")

    def make(self, scan: Path) -> Path:
        return self.build(scan, self.case_id)


def _case(edit: Callable[[Path], object] | None = None, **options: object) -> Callable[[Path, str], Path]:
    """A builder: a one-beam small case (beam 1 SETUP, beam 2 treated), then `edit` on it."""

    def build(scan: Path, case_id: str) -> Path:
        case_dir = small_case(scan, case_id, **options)
        if edit is not None:
            edit(case_dir)
        return case_dir

    return build


def _edit_plan(change: Callable[[pydicom.Dataset], None]) -> Callable[[Path], None]:
    def edit(case_dir: Path) -> None:
        path = plan_file(case_dir)
        plan = pydicom.dcmread(path)
        change(plan)
        plan.save_as(path)

    return edit


def _photon_plan(plan: pydicom.Dataset) -> None:
    plan.SOPClassUID = plan.file_meta.MediaStorageSOPClassUID = PHOTON_PLAN_SOP_CLASS


def _photon_beams(plan: pydicom.Dataset) -> None:
    for beam in plan.IonBeamSequence:
        beam.RadiationType = "PHOTON"


def _cut(path: Path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _second_plan(case_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as elsewhere:
        other = small_case(Path(elsewhere), "OTHER", seed=1)
        (case_dir / "old plan").mkdir()
        shutil.copy2(plan_file(other), case_dir / "old plan" / "plan.dcm")


def _extra_delivery(case_dir: Path) -> None:
    extra = case_dir / "2025042409000000"
    shutil.copytree(case_dir / DELIVERY, extra)
    set_planinfo(extra, "DICOM_BEAM_NUMBER", "9")


def _append_line(line: str) -> Callable[[Path], None]:
    return lambda case_dir: _append(case_dir, f"{DELIVERY}/PlanInfo.txt", f"{line}\n".encode())


def _planinfo(key: str, value: str) -> Callable[[Path], None]:
    return lambda case_dir: set_planinfo(case_dir / DELIVERY, key, value)


def _empty_folder(scan: Path, case_id: str) -> Path:
    case_dir = scan / case_id
    case_dir.mkdir(parents=True)
    (case_dir / "_CASE_READY").touch()
    return case_dir


def _link_out_of_case(case_dir: Path) -> None:
    """A link to another patient's plan outside the scan folder: if followed, two plans."""
    target = small_case(outside(case_dir.parent), "OTHER-PATIENT", seed=2)
    (case_dir / "RP.linked.dcm").symlink_to(plan_file(target))


def _link_loop(case_dir: Path) -> None:
    (case_dir / "RP.loop.dcm").symlink_to("RP.loop.dcm")


def _named_pipe(case_dir: Path) -> None:
    os.mkfifo(case_dir / DELIVERY / "PlanInfo.txt.fifo.dcm")


def _no_mode(path_in_case: str) -> Callable[[Path], None]:
    def edit(case_dir: Path) -> None:
        target = plan_file(case_dir) if path_in_case == "plan" else case_dir / path_in_case
        target.chmod(0)

    return edit


def _remove_beam_folder(number: int) -> Callable[[Path], None]:
    return lambda case_dir: shutil.rmtree(delivery_of(case_dir, number))


def _append(case_dir: Path, relative: str, data: bytes) -> None:
    with (case_dir / relative).open("ab") as stream:
        stream.write(data)


def _grow(case_dir: Path) -> None:
    """The transfer still appending to a machine log after writing the marker (whole records)."""
    _append(case_dir, f"{DELIVERY}/L002.ptn", bytes(16))


def _duplicate_id(scan: Path, case_id: str) -> Path:
    small_case(scan / "G1", case_id, machine="G1")
    return small_case(scan / "G2", case_id, machine="G2")


def _case_folder_link(scan: Path, case_id: str) -> Path:
    target = small_case(outside(scan), f"{case_id}-target")
    link = scan / case_id
    link.symlink_to(target, target_is_directory=True)
    return link


def _renamed(name: bytes) -> Callable[[Path, str], Path]:
    """A case whose folder name the sample writer cannot take (bytes that are not UTF-8)."""

    def build(scan: Path, case_id: str) -> Path:
        return small_case(scan, "RENAME-ME").rename(scan / os.fsdecode(name))

    return build


def _hostile(kind: str, case_id: str, why: str) -> BadCase:
    return BadCase(kind, _case(), "flow", (), state="Completed", case_id=case_id, why=why)


_SAFE = "runs: tools get argument lists and absolute paths, no shell ever parses a case id"

BAD_CASES: list[BadCase] = [
    # -- the plan -------------------------------------------------------------------------
    BadCase(
        "no-rtplan",
        _case(lambda d: plan_file(d).unlink()),
        "sensor",
        ("it has no RTPLAN yet",),
        event="mqi.case.incomplete",
        why="a marker written before the plan: wait, report (a run would fail at discovery, then rerun "
        "after every pause of the copy)",
    ),
    BadCase(
        "two-rtplans",
        _case(_second_plan),
        "flow",
        ("2 RTPLAN files, expected exactly one", "old plan/plan.dcm", "RP."),
        "Failed",
    ),
    BadCase(
        "corrupt-plan",
        _case(lambda d: plan_file(d).write_bytes(bytes(128) + b"DICM" + b"\xff" * 200)),
        "flow",
        ("RP.", "DICOM file", "no RTPLAN found"),
        "Failed",
    ),
    BadCase(
        "truncated-plan",
        _case(lambda d: _cut(plan_file(d), 0.6)),
        "flow",
        ("RP.", "truncated DICOM file"),
        "Failed",
    ),
    BadCase(
        "zero-byte-plan",
        _case(lambda d: _cut(plan_file(d), 0)),
        "flow",
        ("RP.", "empty file (0 bytes)", "no RTPLAN found"),
        "Failed",
    ),
    BadCase(
        "photon-plan",
        _case(_edit_plan(_photon_plan)),
        "flow",
        ("RP.", "not an RT Ion Plan", PHOTON_PLAN_SOP_CLASS),
        "Failed",
    ),
    BadCase(
        "photon-beams-in-ion-plan",
        _case(_edit_plan(_photon_beams)),
        "flow",
        ("beam 2 '1G000:TX'", "RadiationType PHOTON: only proton beams can be recalculated"),
        "Failed",
    ),
    BadCase(
        "no-treatment-beams",
        _case(beams=0),
        "flow",
        ("RP.", "no treatment beams (every beam is a setup field or has no meterset)"),
        "Failed",
    ),
    # -- delivery folders and PlanInfo ------------------------------------------------------
    BadCase(
        "treatment-beam-without-delivery",
        _case(_remove_beam_folder(3), beams=2),
        "sensor",
        ("treatment beam(s) 3 have no delivery folder",),
        event="mqi.case.incomplete",
        why="fewer delivery folders than beams: the transfer may still be copying; wait, report",
    ),
    BadCase(
        "extra-delivery-folder",
        _case(_extra_delivery),
        "flow",
        ("delivery folder '2025042409000000'", "DICOM_BEAM_NUMBER 9 is not a beam of the plan"),
        "Failed",
    ),
    BadCase(
        "planinfo-missing",
        _case(lambda d: (d / DELIVERY / "PlanInfo.txt").unlink()),
        "sensor",
        (f"delivery folder '{DELIVERY}' has machine logs but no PlanInfo.txt yet",),
        event="mqi.case.incomplete",
        why="the machine logs came before their PlanInfo.txt: wait, report",
    ),
    BadCase(
        "planinfo-unparsable",
        _case(_append_line("THIS LINE HAS NO COMMA")),
        "flow",
        (f"delivery folder '{DELIVERY}' PlanInfo.txt line 8", "not a KEY,VALUE line"),
        "Failed",
    ),
    BadCase(
        "planinfo-other-patient",
        _case(_planinfo("DICOM_PATIENT_ID", "99999999")),
        "flow",
        (
            f"'{DELIVERY}' PlanInfo.txt",
            "DICOM_PATIENT_ID '99999999' (beam 2) differs from the plan's PatientID",
        ),
        "Failed",
    ),
    BadCase(
        "planinfo-beam-not-in-plan",
        _case(_planinfo("DICOM_BEAM_NUMBER", "7")),
        "flow",
        (f"'{DELIVERY}' PlanInfo.txt", "DICOM_BEAM_NUMBER 7 is not a beam of the plan", "beam 2 '1G000:TX'"),
        "Failed",
    ),
    BadCase(
        "layer-count-mismatch",
        _case(lambda d: drop_last_layer_row(d / DELIVERY)),
        "flow",
        (
            f"delivery folder '{DELIVERY}' (beam 2 '1G000:TX')",
            "PlanRange.txt has 1 layer rows, the plan has 2",
        ),
        "Failed",
    ),
    # -- files ----------------------------------------------------------------------------
    BadCase(
        "empty-folder",
        _empty_folder,
        "sensor",
        ("the case folder is empty",),
        event="mqi.case.incomplete",
        why="a marker written before any file: wait, report",
    ),
    BadCase(
        "zero-byte-log",
        _case(lambda d: _cut(d / DELIVERY / "L001.ptn", 0)),
        "flow",
        (f"delivery folder '{DELIVERY}' (beam 2) L001.ptn", "empty file (0 bytes)"),
        "Failed",
    ),
    BadCase(
        "cut-log",
        _case(lambda d: _append(d, f"{DELIVERY}/L002.ptn", b"\x01\x02\x03")),
        "flow",
        (f"'{DELIVERY}' (beam 2) L002.ptn", "not a whole number of 16-byte records"),
        "Failed",
    ),
    BadCase(
        "symlink-out-of-the-scan-folder",
        _case(_link_out_of_case),
        "flow",
        ("RP.linked.dcm", "leads outside the case folder; not followed"),
        "Failed",
        why="a link out of the case would make discovery and the interpreter read another patient's files",
    ),
    BadCase(
        "symlink-loop",
        _case(_link_loop),
        "flow",
        ("RP.loop.dcm", "cannot be followed (Too many levels of symbolic links)"),
        "Failed",
    ),
    BadCase(
        "named-pipe",
        _case(_named_pipe),
        "flow",
        (f"{DELIVERY}/PlanInfo.txt.fifo.dcm", "is a named pipe, not a regular file; not read"),
        "Failed",
        why="reading a pipe blocks for ever: it once would have hung discovery and the sensor",
    ),
    BadCase(
        "unreadable-plan",
        _case(_no_mode("plan")),
        "flow",
        ("RP.", "cannot read file (Permission denied)", "no RTPLAN found"),
        "Failed",
        needs_permissions=True,
    ),
    BadCase(
        "unreadable-log",
        _case(_no_mode(f"{DELIVERY}/L001.ptn")),
        "flow",
        (f"'{DELIVERY}' (beam 2) L001.ptn", "cannot read (Permission denied)"),
        "Failed",
        needs_permissions=True,
    ),
    # -- folders the sensor must not run ------------------------------------------------------
    BadCase(
        "unreadable-delivery-folder",
        _case(_no_mode(DELIVERY)),
        "sensor",
        (f"cannot read '{DELIVERY}' (Permission denied)",),
        event="mqi.case.rejected",
        needs_permissions=True,
        why="its key (the content) cannot be computed; looked at again every poll",
    ),
    BadCase(
        "marker-while-files-grow",
        _case(),
        "sensor",
        (f"its files are still changing ({DELIVERY}/L002.ptn)",),
        event="mqi.case.incomplete",
        grow=_grow,
        why="a marker written before the copy ended: run once nothing changed for settle_seconds",
    ),
    BadCase(
        "two-folders-one-case-id",
        _duplicate_id,
        "sensor",
        ("case id 'BAD-two-folders-one-case-id' is also claimed by G1/BAD-two-folders-one-case-id",),
        event="mqi.case.rejected",
        why="their runs would share work and output folders: neither runs while both exist",
    ),
    BadCase(
        "case-folder-symlink-out-of-the-scan-folder",
        _case_folder_link,
        "sensor",
        ("symbolic link to", "leads outside the scan folder; not followed"),
        event="mqi.case.rejected",
    ),
    # -- names ----------------------------------------------------------------------------
    _hostile("name-spaces", "BAD name with spaces", _SAFE),
    _hostile("name-quotes", 'BAD O\'Brien "quoted"', _SAFE),
    _hostile("name-semicolon", f"BAD;touch {INJECTED}-semicolon", _SAFE),
    _hostile("name-command-substitution", f"BAD$(touch {INJECTED}-dollar)", _SAFE),
    _hostile("name-backticks", f"BAD`touch {INJECTED}-backtick`", _SAFE),
    _hostile("name-unicode", "BAD Ünïcødé 患者 – ü", "runs: names are unicode text everywhere"),
    _hostile("name-leading-dash", "-BAD --help", "runs: tools get absolute paths, never a bare name"),
    BadCase(
        "name-newline",
        _case(),
        "sensor",
        ("the folder name contains a control character (U+000A); rename the folder",),
        event="mqi.case.rejected",
        case_id="BAD\nnewline",
        why="refused: a newline splits log lines and run names and cannot exist on a Windows share",
    ),
    BadCase(
        "name-not-utf8",
        _renamed(b"BAD-latin1-\xe9"),
        "sensor",
        ("the folder name is not valid UTF-8 (byte 0xe9); rename the folder",),
        event="mqi.case.rejected",
        case_id=os.fsdecode(b"BAD-latin1-\xe9"),
        why="refused: the name cannot be sent to the Prefect server (JSON is UTF-8)",
    ),
]

FLOW_CASES = [case for case in BAD_CASES if case.level == "flow"]
SENSOR_CASES = [case for case in BAD_CASES if case.level == "sensor"]

BY_KIND = {case.kind: case for case in BAD_CASES}
SENSOR_TICK_SECONDS = 0.25  # the fake clock's step between polls in `observe`


def observe(case: BadCase, case_dir: Path, settings: Settings) -> str:
    """What the fast path says of `case`, without a server.

    Flow level: the inspection's problems, one per line (what the Failed message lists).
    Sensor level: what the sensor would report while polling with a fake clock until
    past the report time; AssertionError if it would start a run for any folder.
    """
    if case.level == "flow":
        return "\n".join(inspect_case(case_dir, ready_marker=settings.case.ready_marker).problems)
    now = 0.0
    watcher = CaseWatcher(settings, clock=lambda: now)
    said: list[str] = []
    end = 2 * settings.sensor.settle_seconds + settings.sensor.incomplete_report_seconds + 1
    while now <= end:
        for ready in watcher.ready_cases():
            verdict = watcher.verdict(ready)
            if verdict == "run":
                raise AssertionError(f"{case.kind}: the sensor would run {ready.folder.name!r}")
            if verdict == "report" and ready.folder.path == case_dir:
                said.append(watcher.waiting(ready).text)
        said += [
            reason for path, reason in watcher.skipped.items() if path == case_dir and reason not in said
        ]
        if case.grow is not None:
            case.grow(case_dir)
        now += SENSOR_TICK_SECONDS
    return "\n".join(said)


def observe_as_configured(case: BadCase, case_dir: Path, config: Path) -> str:
    """`observe`, in a process without root's right to read any file when the kind needs it."""
    prefix = without_privileges() if case.needs_permissions else []
    if not prefix:
        return observe(case, case_dir, load_settings(config, env={}))
    argv = [*prefix, sys.executable, "-m", "tests.bad_cases", case.kind, os.fsdecode(case_dir), str(config)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, check=True, timeout=120)
    return json.loads(done.stdout)


def main() -> None:
    """`python -m tests.bad_cases KIND CASE_DIR CONFIG`: print `observe`'s message as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(BY_KIND))
    parser.add_argument("case_dir", type=Path)
    parser.add_argument("config", type=Path)
    args = parser.parse_args()
    print(json.dumps(observe(BY_KIND[args.kind], args.case_dir, load_settings(args.config, env={}))))


if __name__ == "__main__":
    main()
