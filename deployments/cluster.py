"""What the machines of one Prefect server share, and how a lost machine's runs come back.

`mqi up` on the server machine records on the server where the shared paths are
(`server.shared_paths`: the scan folder, the outputs, the results); a worker-only machine
(`mqi up --no-server --api URL`) compares its own with that record and refuses to start
if they differ, since any case run may run on any worker. The server machine also
creates the LocalFileSystem block on the shared results folder that every worker's
flow runs use as Prefect's default result storage, and the automations that mark a
case run Crashed when its heartbeats stop, or when a worker took it (Pending) and never
started it: its machine died. The file sensor then resumes it on a surviving worker
(tasks/prefect_api/resume.py).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.filesystems import LocalFileSystem

from config.settings import Settings
from deployments.server import ServiceError

SHARED_PATHS_VARIABLE = "mqi_shared_paths"
RESULT_STORAGE_BLOCK = "mqi-results"
CRASH_AUTOMATION = "mqi: case run crashed (heartbeats stopped)"
NEVER_STARTED_AUTOMATION = "mqi: case run crashed (taken by a worker, never started)"
# Every flow run sends a heartbeat event this often (Prefect's minimum is 30 s) ...
HEARTBEAT_SECONDS = 30
# ... and one that sent none for this long is marked Crashed: three heartbeats missed.
SILENCE_SECONDS = 90


def worker_env() -> dict[str, str]:
    """What the worker of every machine sets for its flow runs: heartbeats, the shared result storage.

    And no CSRF tokens: the servers `mqi` starts do not ask for them, yet every Prefect client
    asks for one before its first write (9 calls of a 4-beam case, measured: README).
    """
    return {
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": f"local-file-system/{RESULT_STORAGE_BLOCK}",
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
    }


def database_env(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """The server process's database setting (with the password from `env`); {} for SQLite."""
    try:
        url = settings.database_url(env)
    except ValueError as error:
        raise ServiceError(str(error)) from None
    return {} if url is None else {"PREFECT_SERVER_DATABASE_CONNECTION_URL": url}


def _record(settings: Settings) -> dict[str, Any]:
    return {"machine": settings.machine, "paths": settings.shared_paths()}


def record_shared_paths(client: SyncPrefectClient, settings: Settings) -> None:
    """The server machine's shared paths, for the workers of other machines to check theirs against."""
    value = _record(settings)
    if client.read_variable_by_name(SHARED_PATHS_VARIABLE) is None:
        client.create_variable(VariableCreate(name=SHARED_PATHS_VARIABLE, value=value))
    else:
        client.update_variable(VariableUpdate(name=SHARED_PATHS_VARIABLE, value=value))


def check_shared_paths(client: SyncPrefectClient, settings: Settings) -> None:
    """Refuse (ServiceError) unless this machine's shared paths are those the server recorded."""
    variable = client.read_variable_by_name(SHARED_PATHS_VARIABLE)
    if variable is None or not isinstance(variable.value, dict):
        raise ServiceError(
            f"the server has no record of the shared paths (variable {SHARED_PATHS_VARIABLE}); "
            "start `mqi up` on the server machine first"
        )
    theirs: dict[str, str] = variable.value.get("paths", {})
    ours = settings.shared_paths()
    differ = [
        f"{name}: here {ours.get(name, '(not shared)')}, on {variable.value.get('machine')} "
        f"{theirs.get(name, '(not shared)')}"
        for name in sorted(set(ours) | set(theirs))
        if ours.get(name) != theirs.get(name)
    ]
    if differ:
        raise ServiceError(
            f"machine {settings.machine} ({settings.source}): its shared paths differ from the server's "
            f"record, so case runs would not find their files here; mount them at the same place or fix "
            "paths / server.shared_paths:\n  " + "\n  ".join(differ)
        )


def ensure_result_storage(settings: Settings) -> None:
    """The LocalFileSystem block on the shared results folder (Prefect's default result storage)."""
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    LocalFileSystem(basepath=str(settings.results_dir)).save(RESULT_STORAGE_BLOCK, overwrite=True)


FINAL = {f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Cancelled", "Crashed")}
# After Pending, a run's next state: Running, or anything that took it off its worker.
LEFT_PENDING = FINAL | {
    f"prefect.flow-run.{name}" for name in ("Running", "Cancelling", "Scheduled", "AwaitingRetry", "Late")
}


def _crash_after(name: str, after: set[str], expect: set[str], seconds: float, why: str) -> AutomationCore:
    """Set a flow run Crashed when `after` is not followed by one of `expect` within `seconds`."""
    return AutomationCore(
        name=name,
        description=f"Marks a flow run Crashed when {why}, so the file sensor resumes it on a surviving "
        "worker (MQI Communicator, deployments/cluster.py).",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after=after,
            expect=expect,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED, message=f"{why} for {seconds:g} s: its worker machine is gone"
            )
        ],
    )


def crash_automations(silence_seconds: float = SILENCE_SECONDS) -> list[AutomationCore]:
    """A run that went Running or sent a heartbeat and then nothing, or that a worker took and never
    started: Crashed."""
    return [
        _crash_after(
            CRASH_AUTOMATION,
            # Running too: a run killed before its first heartbeat reached the server sent none.
            {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
            FINAL | {"prefect.flow-run.heartbeat"},
            silence_seconds,
            "no heartbeat",
        ),
        _crash_after(
            NEVER_STARTED_AUTOMATION,
            {"prefect.flow-run.Pending"},
            LEFT_PENDING,
            silence_seconds,
            "taken by a worker but not started",
        ),
    ]


def _compared(automation: AutomationCore) -> object:
    """What makes two automations the same for `ensure_crash_automations` (not the server's ids;
    event-name sets in any order)."""

    def normal(value: object) -> object:
        if isinstance(value, dict):
            return {key: normal(item) for key, item in value.items()}
        if isinstance(value, list):
            items = [normal(item) for item in value]
            return sorted(items) if all(isinstance(item, str) for item in items) else items
        return value

    fields = {"name", "description", "enabled", "trigger", "actions"}
    return normal(automation.model_dump(mode="json", include=fields, exclude_none=True))


def ensure_crash_automations(client: SyncPrefectClient, silence_seconds: float = SILENCE_SECONDS) -> None:
    """Create the automations, or bring existing ones up to date."""
    for automation in crash_automations(silence_seconds):
        existing = client.read_automations_by_name(automation.name)
        if existing:
            # Only if it changed: an update gives the trigger a new id on the server, and Prefect
            # keys a trigger's pending buckets (the runs it is timing) by that id, so every run
            # that went quiet before this start would never be marked.
            if _compared(existing[0]) != _compared(automation):
                client.update_automation(existing[0].id, automation)
        else:
            client.create_automation(automation)
