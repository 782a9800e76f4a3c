"""Inspect a case folder (every problem at once) and discover its case (or fail listing them).

Folder-name and folder-order heuristics once mapped deliveries to the wrong beams, so
PlanInfo.txt's DICOM_BEAM_NUMBER is the only link from a delivery folder to a beam, and
every disagreement with the plan is reported, all at once, naming the case, the file,
the beam and the field. Nothing in the case folder is ever written.
"""

from __future__ import annotations

import os
from pathlib import Path

from config.settings import DEFAULT_DELIVERY_POLICY, DEFAULT_READY_MARKER, DELIVERY_POLICIES, DeliveryPolicy
from tasks.casefolder.content import CaseContent, FileEntry, counted, describe_changes, list_files
from tasks.casefolder.deliveries import (
    PLANINFO_NAME,
    PLANRANGE_NAMES,
    DeliveryRecord,
    delivery_folders,
    find_named,
    read_delivery,
)
from tasks.casefolder.matching import match_deliveries
from tasks.casefolder.model import Beam, Case, CaseError, Inspection
from tasks.casefolder.names import name_problem
from tasks.casefolder.plan import ROOM_PATTERN, Plan, find_rtplans, read_plan
from tasks.casefolder.problems import Problems, relative


def _case_folders_below(folder: Path, plans: list[Path]) -> bool:
    """Whether the plans found are each in a subfolder of its own: `folder` holds cases, not a case."""
    parents = [path.parent for path in plans]
    return folder not in parents and len(set(parents)) == len(parents)


def _inspect_folder(
    case_dir: Path, policy: DeliveryPolicy, problems: Problems, arriving: list[str]
) -> tuple[Plan | None, list[Beam], list[int]]:
    """Find the plan and the deliveries and match them; problems are collected, not raised.

    Returns the plan, the matched beams and the treatment beams without a delivery folder;
    adds to `arriving` what looks like files not copied yet (see Inspection.arriving).
    """
    found, unreadable = find_rtplans(case_dir)
    for path, reason in unreadable:
        problems.add(relative(path, case_dir), reason)
    plan = None
    if not found:
        problems.add(".", "no RTPLAN found in the case folder (DICOM headers read there and one level below)")
        if not unreadable:  # an unreadable or broken file may be the plan: that is reported, not awaited
            arriving.append("it has no RTPLAN yet")
    elif len(found) > 1 and _case_folders_below(case_dir, [path for path, _ in found]):
        names = ", ".join(sorted(path.parent.name for path, _ in found))
        problems.add(".", f"this is a scan folder holding the cases {names}, not a case folder: give one")
        return None, [], []
    elif len(found) > 1:
        names = ", ".join(relative(path, case_dir) for path, _ in found)
        problems.add(".", f"{len(found)} RTPLAN files, expected exactly one: {names}")
    else:
        path, dataset = found[0]
        try:
            plan = read_plan(path, dataset, case_dir, problems)
        except Exception as error:  # malformed values in an untrusted plan surface on access
            problems.add(relative(path, case_dir), f"cannot read the plan ({type(error).__name__}: {error})")
    records: list[DeliveryRecord] = []
    claimed: set[int] = set()
    folders = list(delivery_folders(case_dir, Path(os.path.realpath(case_dir))))
    for folder, entries in folders:
        planinfo = find_named(entries, PLANINFO_NAME)
        if planinfo is None:
            # Guessing its beam from the folder name or order is what mapped deliveries wrongly before.
            problems.add(
                f"delivery folder {folder.name!r}",
                f"holds machine log files (.ptn/.mgn) but no {PLANINFO_NAME}",
            )
            arriving.append(f"delivery folder {folder.name!r} has machine logs but no {PLANINFO_NAME} yet")
            continue
        if not any(find_named(entries, name) for name in PLANRANGE_NAMES):
            arriving.append(f"delivery folder {folder.name!r} has no {PLANRANGE_NAMES[0]} yet")
        record, beam_number = read_delivery(folder, planinfo, entries, problems)
        if record is not None:
            records.append(record)
        elif beam_number is not None:
            claimed.add(beam_number)
    if plan is None:
        return None, [], []
    beams, missing = match_deliveries(plan, records, claimed, policy, problems)
    # Only a case with fewer delivery folders than treatment beams may still be arriving;
    # in any other the folder of a missing beam is there but broken, and that is reported.
    arriving = len(folders) < len(plan.treatment) + len(plan.unusable)
    return plan, beams, missing if arriving else []


def inspect_case(
    case_dir: Path | str,
    *,
    ready_marker: str = DEFAULT_READY_MARKER,
    delivery_policy: DeliveryPolicy = DEFAULT_DELIVERY_POLICY,
) -> Inspection:
    """Inspect a case folder without raising for anything wrong in it.

    Every problem is collected so that one look tells the physicist all that must be
    fixed. The readiness marker is reported in `ready`, never as a problem.
    """
    if delivery_policy not in DELIVERY_POLICIES:
        raise ValueError(f"delivery_policy must be one of {DELIVERY_POLICIES}, not {delivery_policy!r}")
    case_path = Path(os.path.abspath(case_dir))
    problems = Problems(case_path.name)
    plan: Plan | None = None
    beams: list[Beam] = []
    missing: list[int] = []
    arriving: list[str] = []
    files: list[FileEntry] = []
    ready = False
    name = name_problem(case_path.name)
    if name is not None:
        problems.add(".", name)
    try:
        ready = (case_path / ready_marker).is_file()
        if not case_path.is_dir():
            problems.add(str(case_path), "is not a folder")
        elif all(entry.name == ready_marker for entry in case_path.iterdir()):
            problems.add(".", "the case folder is empty (no RTPLAN, no delivery folders)")
            arriving.append("the case folder is empty")
        else:
            files = list_files(case_path)
            plan, beams, missing = _inspect_folder(case_path, delivery_policy, problems, arriving)
            changed = describe_changes(
                counted(files, ready_marker), counted(list_files(case_path), ready_marker)
            )
            if changed:  # what was read may be half old, half new
                problems.add(".", f"files changed while the case folder was read ({changed})")
                arriving.append(f"its files changed while it was read ({changed})")
    except OSError as error:  # a folder vanishing or locked mid-scan: report it, never raise
        problems.add(str(error.filename or case_path), f"cannot read ({error.strerror})")
    excluded = sorted(plan.excluded.values(), key=lambda beam: beam.number) if plan else []
    case = None
    if plan is not None and not problems.messages:
        machine = next(iter(plan.treatment.values())).machine
        room = ROOM_PATTERN.search(machine)
        case = Case(
            case_id=case_path.name,
            case_dir=str(case_path),
            plan_path=str(plan.path),
            plan_source=str(plan.path),
            patient_id=plan.patient_id,
            study_instance_uid=plan.study_instance_uid,
            frame_of_reference_uid=plan.frame_of_reference_uid,
            plan_sop_instance_uid=plan.sop_instance_uid,
            plan_label=plan.label,
            machine=machine,
            room=int(room.group(1)) if room else None,
            beams=beams,
            excluded=excluded,
            content=CaseContent.of(case_path.name, case_path, files, ready_marker),
        )
    return Inspection(
        case_id=case_path.name,
        case_dir=str(case_path),
        ready=ready,
        plan_path=str(plan.path) if plan else None,
        beams=beams,
        excluded=excluded,
        problems=problems.messages,
        case=case,
        delivery_policy=delivery_policy,
        missing_deliveries=missing,
        arriving=arriving,
    )


def discover_case(
    case_dir: Path | str,
    *,
    ready_marker: str | None = None,
    delivery_policy: DeliveryPolicy = DEFAULT_DELIVERY_POLICY,
) -> Case:
    """The case in `case_dir`, or CaseError listing every problem.

    With `ready_marker` given, a missing marker is a problem too, so a case flow started
    by hand never runs a half-copied folder; None skips the check for sources that write
    no marker (their readiness comes from a quiet period).
    """
    inspection = inspect_case(
        case_dir, ready_marker=ready_marker or DEFAULT_READY_MARKER, delivery_policy=delivery_policy
    )
    problems = list(inspection.problems)
    if ready_marker and not inspection.ready:
        problems.append(f"{inspection.case_id}: {ready_marker}: readiness marker is missing")
    if problems or inspection.case is None:
        raise CaseError(inspection.case_id, problems)
    return inspection.case
