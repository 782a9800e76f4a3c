"""The run's own copy of the case's plan, in its work folder: what every later step reads.

Discovery checks the plan in the case folder; staging the interpreter's input, the
engine inputs and the dose conversion then read the plan again, the conversion after the
last beam's GPU time. A plan replaced or a case folder renamed in between would make
them read another plan, or none. So the plan is copied once, right after discovery, to
`<work dir>/plan/` (replaced by each run), and the Case handed on names the copy; the
case folder is only read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tasks.casefolder.model import Case

PLAN_COPY_FOLDER = "plan"


def keep_plan_copy(case: Case, work_dir: Path) -> Case:
    """Copy the case's plan to `work_dir/plan/` (same file name); the case, reading the copy."""
    source = Path(case.plan_source)
    folder = work_dir / PLAN_COPY_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / source.name
    partial = folder / f".{source.name}.part"
    shutil.copyfile(source, partial)
    os.replace(partial, copy)
    for stale in folder.iterdir():  # an earlier run's plan of another name
        if stale != copy:
            stale.unlink()
    return case.model_copy(update={"plan_path": str(copy)})
