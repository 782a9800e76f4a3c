"""The interpreter's own input folder: the plan and exactly one delivery folder per treatment beam.

The clinic's interpreter (read from its source, main_cli.py and config_loader.py) takes
the first RTPLAN it finds anywhere under its --logdir, reads every `*.ptn` below it in
sorted path order and hands them out to the plan's beams layer by layer, in plan order;
PlanInfo.txt's DICOM_BEAM_NUMBER is only checked, never used to map. A second fraction,
delivery folders sorted differently from the plan's beams, or a setup field it does not
recognise as one (it knows only the name SETUP and the description "Site Setup") all give
wrong CSVs with exit 0. So it is given a folder of its own:

    <folder>/<plan file>     the plan without the beams discovery excluded (setup fields)
    <folder>/01/, 02/, ...   a copy of the delivery chosen for each treatment beam, in plan order
                             (digits only: it reads PlanRange only in folders named by digits)

The case folder itself is only read, and the copy is checked to be of what discovery read
(tasks/casefolder/content.py). The plan is read from the run's copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from tasks.casefolder import Case
from tasks.casefolder.content import check_unchanged


def stage_interpreter_input(case: Case, folder: Path) -> Path:
    """Write `folder` for `case` (replacing what an earlier run left there); return it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    plan_path = Path(case.plan_path)
    plan = pydicom.dcmread(plan_path)
    treated = {beam.number for beam in case.beams}
    plan.IonBeamSequence = [item for item in plan.IonBeamSequence if int(item.BeamNumber) in treated]
    for group in plan.get("FractionGroupSequence", []):
        refs = [
            ref for ref in group.get("ReferencedBeamSequence", []) if int(ref.ReferencedBeamNumber) in treated
        ]
        group.ReferencedBeamSequence = refs
        group.NumberOfBeams = len(refs)
    plan.save_as(folder / plan_path.name, enforce_file_format=True)
    order = [int(item.BeamNumber) for item in plan.IonBeamSequence]
    deliveries = {beam.number: Path(beam.delivery.path) for beam in case.beams}
    width = max(2, len(str(len(order))))
    try:
        for index, number in enumerate(order, start=1):
            shutil.copytree(deliveries[number], folder / f"{index:0{width}d}", symlinks=False)
    except OSError:
        check_unchanged(case.content)  # a folder renamed or changed since discovery says so
        raise
    check_unchanged(case.content)  # what was copied is what discovery read
    return folder
