"""`mqi status` and `mqi rerun`: the service's case runs as the Prefect server records them."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from rich.console import Console
from rich.table import Table

from config.settings import Settings
from deployments.server import SENSOR_FLOW, ServiceError, api_url, connected, ui_url
from flows.sensor import start_case_run
from tasks.casefolder import inspect_case
from tasks.scanfolder.folders import CaseFolder, case_folders, room_tag

STATUS_COLUMNS = ("case", "state", "beams", "trigger", "started", "duration", "message")
BEAMS_DONE = re.compile(r"(\d+)/(\d+) beams done")


def _duration(run: FlowRun) -> str:
    seconds = run.estimated_run_time.total_seconds()
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def status_rows(settings: Settings, client: SyncPrefectClient, limit: int) -> list[dict[str, str]]:
    """The most recent case runs, newest first: case, state, beams done, trigger, start, duration."""
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[settings.case_flow_name])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=limit,
    )
    rows = []
    for run in runs:
        message = (run.state.message or "") if run.state else ""
        beams = BEAMS_DONE.search(message)
        start = run.start_time or run.expected_start_time
        rows.append(
            {
                "case": run.name,
                "state": run.state_name or "",
                "beams": f"{beams.group(1)}/{beams.group(2)}" if beams else "",
                "trigger": ", ".join(
                    tag.removeprefix("trigger:") for tag in run.tags if tag.startswith("trigger:")
                ),
                "started": start.astimezone().strftime("%Y-%m-%d %H:%M:%S") if start else "",
                "duration": _duration(run) if run.start_time else "",
                "message": message.splitlines()[0] if message else "",
            }
        )
    return rows


def sensor_state(client: SyncPrefectClient) -> str:
    """The file sensor's newest run, as 'name: state'."""
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[SENSOR_FLOW])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=1,
    )
    return f"{runs[0].name}: {runs[0].state_name}" if runs else "never started"


def find_case(settings: Settings, case: str) -> CaseFolder:
    """A case given by its folder (in the scan folder or not) or by its case id in the scan folder."""
    given = Path(case)
    wanted = given.resolve() if given.is_dir() else None
    found = [
        folder
        for folder in case_folders(settings.scan_dir, settings.sensor.room_folders, {})
        if (folder.path.resolve() == wanted if wanted else folder.case_id == case)
    ]
    if len(found) == 1:
        return found[0]
    if wanted is not None:
        return CaseFolder(wanted, wanted.name, None)
    if found:
        where = ", ".join(str(folder.path) for folder in found)
        raise ServiceError(f"case {case!r} is in several folders: {where}; give the folder")
    raise ServiceError(f"no case folder {case!r} in {settings.scan_dir} or its room folders; give the folder")


def rerun(settings: Settings, case: str, beams: list[int], force: bool) -> FlowRun:
    """A new run of the case deployment, tagged trigger:manual; finished beams are reused unless asked."""
    folder = find_case(settings, case)
    inspection = inspect_case(
        folder.path, ready_marker=settings.case.ready_marker, delivery_policy=settings.case.delivery_policy
    )
    treatment = [beam.number for beam in inspection.beams]
    unknown = sorted(set(beams) - set(treatment))
    if unknown and not inspection.problems:  # refused before a run is made that would fail
        raise ServiceError(
            f"case {folder.case_id} has no treatment beam {', '.join(map(str, unknown))} "
            f"(treatment beams: {', '.join(map(str, treatment))})"
        )
    run, _ = start_case_run(  # no idempotency key: always a new run
        settings,
        folder.path,
        trigger="manual",
        room=room_tag(folder, inspection),
        extra={"rerun_beams": beams, "force": force},
    )
    return run


def wait_final(client: SyncPrefectClient, run_id: UUID, poll: float = 1.0) -> FlowRun:
    """The run once it reached a final state."""
    run = client.read_flow_run(run_id)
    while run.state is None or not run.state.is_final():
        time.sleep(poll)
        run = client.read_flow_run(run_id)
    return run


def print_status(settings: Settings, port: int | None, limit: int, api: str | None = None) -> int:
    """`mqi status`: the recent case runs and the file sensor."""
    api = api_url(port, api)
    try:
        with connected(api) as client:
            rows = status_rows(settings, client, limit)
            sensor = sensor_state(client)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = Table(*STATUS_COLUMNS, title=f"recent cases ({ui_url(api)})")
    for row in rows:
        table.add_row(*(row[column] for column in STATUS_COLUMNS))
    console = Console(markup=False)  # case names and messages printed as they are
    console.print(table)
    console.print(f"file sensor: {sensor}")
    return 0


def start_rerun(
    settings: Settings,
    port: int | None,
    case: str,
    beams: list[int],
    force: bool,
    wait: bool,
    api: str | None = None,
) -> int:
    """`mqi rerun`: start the run, print its link; with `wait`, its final state (exit 1 unless Completed)."""
    api = api_url(port, api)
    try:
        with connected(api) as client:
            run = rerun(settings, case, beams, force)
            print(f"run {run.name} started: {ui_url(api)}/runs/flow-run/{run.id}", flush=True)
            if not wait:
                return 0
            run = wait_final(client, run.id)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    assert run.state is not None  # final
    print(f"{run.state.name}: {run.state.message}")
    return 0 if run.state.is_completed() else 1
