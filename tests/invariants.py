"""The invariants every fault scenario ends with (issue 6), checked in one place.

Whatever failed on the way, at the end of a scenario:
- the case's newest run, as the Prefect server records it, is Completed, or Failed with
  a message that names the cause;
- each beam's engine was launched exactly as often as expected (the stand-in engine's
  launch record, MQI_STANDIN_LAUNCH_LOG), so no GPU job ran twice unless a retry was due;
- no GPU limit slot is still taken;
- every RTDOSE delivered matches the sha256 in its provenance JSON, and only the beams
  that finished (plus the plan sum, when all did) were delivered;
- no file of the case folder changed (its tree hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort

from config import Settings
from tasks.dose.outputs import beam_file_stem
from tasks.gpu.limits import gpu_status
from tasks.gpu.pool import QUEUE_PLACE, GpuPool, SlurmQueue


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `root` (and its mode, so a chmod shows too)."""
    return {
        str(
            path.relative_to(root)
        ): f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o}"
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@dataclass(frozen=True)
class Watched:
    """A case folder whose files were hashed before the scenario touched it."""

    case_dir: Path
    inputs: dict[str, str]

    @property
    def case_id(self) -> str:
        return self.case_dir.name


def watch(case_dir: Path) -> Watched:
    return Watched(case_dir, tree_hash(case_dir))


def engine_launches(launch_log: Path, case_id: str) -> dict[int, int]:
    """Beam number -> engine launches of this case, from the stand-in engine's launch record.

    A launch belongs to the case whose folder name is a component of its input path
    (work/<case>/beams/... locally, <remote root>/<case>/beam-NN/... on the GPU host).
    """
    counts: Counter[int] = Counter()
    if launch_log.exists():
        for line in launch_log.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if (
                record["tool"] == "engine"
                and record["event"] == "start"
                and case_id in Path(record["input"]).parts
            ):
                counts[int(record["key"])] += 1
    return dict(counts)


def newest_case_run(case_id: str) -> FlowRun:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["process-case"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[case_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=1,
        )
    assert runs, f"no run of case {case_id} on the server"
    return runs[0]


def taken_gpu_slots(settings: Settings) -> dict[str, str]:
    """GPU limit name -> who its last lease event names, for every configured GPU whose slot is taken."""
    rows = gpu_status(GpuPool.of(settings.backend))
    missing = [row["limit"] for row in rows if row["state"] == "missing limit"]
    assert not missing, f"GPU limits missing on the server: {missing}"
    return {
        str(row["limit"]): f"{row['case'] or '?'} beam {row['beam_number'] or '?'} since {row['since']}"
        for row in rows
        if row["state"] == "leased"
    }


def delivered(settings: Settings, case_id: str) -> dict[str, str]:
    """RTDOSE file name -> problem ('' if its sha256 is the one its provenance records)."""
    out = settings.output_dir(case_id)
    found: dict[str, str] = {}
    for path in sorted(out.glob("*.dcm")) if out.is_dir() else []:
        provenance = path.with_name(path.stem + ".provenance.json")
        if not provenance.is_file():
            found[path.name] = f"no provenance {provenance.name}"
            continue
        recorded = json.loads(provenance.read_text(encoding="utf-8"))["rtdose_sha256"]
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        found[path.name] = "" if actual == recorded else f"sha256 {actual}, provenance says {recorded}"
    return found


def check_invariants(
    settings: Settings,
    launch_log: Path,
    case: Watched,
    *,
    state: StateType,
    launches: dict[int, int],
    causes: tuple[str, ...] = (),
    done: tuple[int, ...] = (),
) -> FlowRun:
    """Assert every invariant for one case; return its newest run for further checks.

    `launches`: beam -> expected engine launches; `causes`: text the final message must
    hold; `done`: the beams whose RTDOSE must be delivered (the plan sum too if Completed).
    """
    run = newest_case_run(case.case_id)
    assert run.state is not None
    message = run.state.message or ""
    assert run.state.type == state, f"{case.case_id}: {run.state.name}: {message}"
    if state == StateType.COMPLETED:
        assert f"{len(done)}/{len(done)} beams done" in message, message
    else:
        assert state == StateType.FAILED and causes, "a scenario must say which cause the message names"
    for cause in causes:
        assert cause in message, f"{case.case_id}: {cause!r} not in the final message: {message}"

    assert engine_launches(launch_log, case.case_id) == launches, f"{case.case_id}: engine launches"
    taken = taken_gpu_slots(settings)
    assert taken == {}, f"a GPU slot is still taken: {taken}"

    files = delivered(settings, case.case_id)
    wanted = {f"{beam_file_stem(beam)}.dcm" for beam in done}
    if state == StateType.COMPLETED:
        wanted.add("RTDOSE_plan.dcm")
    assert set(files) == wanted, f"{case.case_id}: delivered {sorted(files)}, expected {sorted(wanted)}"
    assert {name: problem for name, problem in files.items() if problem} == {}

    assert tree_hash(case.case_dir) == case.inputs, f"{case.case_id}: input files changed"
    return run


def taken_queue_places(settings: Settings) -> int:
    """How many places of the capped Slurm queue (slurm.max_queued_jobs) are still taken."""
    queue = SlurmQueue.of_settings(settings)
    assert queue is not None, "slurm.max_queued_jobs is not set"
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(queue.limit_name(QUEUE_PLACE)).active_slots
