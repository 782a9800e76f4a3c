"""The file sensor flow: every ready case folder in the scan folder becomes exactly one case run.

Prefect has no filesystem sensor, so this long-running flow (its own deployment, "the
file sensor" in the UI) polls the scan folder. Polling, not inotify: the scan folder is
often a network share, where inotify never hears of files written by another host, and
a poll that reads only folder timestamps is cheap enough to run twice a second (a full
re-read of every case's files every `sensor.rescan_seconds` is the safety net for files
rewritten in place). Exactly once: each run is created with an idempotency key made
from the folder's content, so the server returns the existing run for content it has
seen, whatever duplicate file events or restarts happen; a changed folder has a new key
and runs again. Nothing in the scan folder is ever written.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterIdempotencyKey,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events import emit_event
from prefect.logging import get_run_logger
from prefect.states import AwaitingRetry

from config import load_settings
from config.settings import Settings
from tasks.prefect_api.client import api_client
from tasks.scanfolder.folders import room_tag, shown
from tasks.scanfolder.watcher import CaseWatcher, ReadyCase

KEY_LOOKUP_CHUNK = 100  # idempotency keys per query when matching ready cases to existing runs


def start_case_run(
    settings: Settings,
    case_dir: Path,
    *,
    trigger: str,
    room: str | None,
    key: str | None = None,
    config: str | None = None,
    extra: dict[str, object] | None = None,
) -> FlowRun:
    """Create a run of the case deployment, named after the case and tagged with room and trigger.

    The one place case runs are created (the sensor and `mqi rerun`). `key` makes the
    creation idempotent; `config` is passed only when given, else the worker's MQI_CONFIG
    applies.
    """
    parameters: dict[str, object] = {"case_dir": str(case_dir), **(extra or {})}
    if config is not None:
        parameters["config"] = config
    with api_client() as client:  # a busy server is asked again at once, not after seconds
        deployment = client.read_deployment_by_name(settings.sensor.case_deployment)
        return client.create_flow_run_from_deployment(  # a run of its own, not a child of the sensor's
            deployment.id,
            parameters=parameters,
            name=case_dir.name,
            tags=[tag for tag in (room, f"trigger:{trigger}") if tag],
            idempotency_key=key,
        )


def runs_by_key(client: SyncPrefectClient, flow_name: str, keys: list[str]) -> dict[str, FlowRun]:
    """The existing case runs for these content keys (a restart finds the runs of every old case)."""
    found: dict[str, FlowRun] = {}
    for start in range(0, len(keys), KEY_LOOKUP_CHUNK):
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(
                idempotency_key=FlowRunFilterIdempotencyKey(any_=keys[start : start + KEY_LOOKUP_CHUNK])
            ),
        )
        found.update({run.idempotency_key: run for run in runs if run.idempotency_key})
    return found


def _case_resource(case: ReadyCase) -> dict[str, str]:
    return {
        "prefect.resource.id": f"mqi.case.{case.folder.name}",
        "prefect.resource.name": case.folder.case_id,
        "mqi.case.dir": str(case.folder.path),
    }


class FileSensor:
    """One pass at a time over the scan folder: the Prefect side of `CaseWatcher`."""

    def __init__(self, settings: Settings, client: SyncPrefectClient, config: str | None) -> None:
        self.settings = settings
        self.client = client
        self.config = config
        self.watcher = CaseWatcher(settings)
        self.flow_name = settings.case_flow_name
        self.logger = get_run_logger()
        # The last complaint about each thing (a folder, the server), so a lasting problem is
        # logged once, not every poll; cleared when that thing works again.
        self._said: dict[str, str] = {}

    def _complain_once(self, about: str, message: str) -> bool:
        """Log `message` unless it was the last thing said about `about`; whether it was logged."""
        if self._said.get(about) == message:
            return False
        self._said[about] = message
        self.logger.error(message)
        return True

    def _reject(self, folder: Path, reason: str) -> None:
        """A folder the sensor does not run: said once per reason, in the log and as an event."""
        name = shown(folder.relative_to(self.watcher.scan_dir))
        message = f"case folder {name!r} ({shown(folder)}) not run: {reason}"
        if self._complain_once(str(folder), message):
            emit_event(
                event="mqi.case.rejected",
                resource={"prefect.resource.id": f"mqi.case.{name}", "mqi.case.dir": shown(folder)},
                payload={"reason": reason, "message": message},
            )

    def poll(self) -> None:
        """Look once; a folder that cannot be read or run is reported and skipped, never fatal."""
        scan = str(self.watcher.scan_dir)
        try:
            ready = self.watcher.ready_cases()
        except OSError as error:
            self._complain_once(scan, f"scan folder {scan}: {error}")
            return
        self._said.pop(scan, None)
        for folder, reason in self.watcher.skipped.items():
            self._reject(folder, reason)
        if not ready:
            return
        try:
            existing = runs_by_key(self.client, self.flow_name, [case.key for case in ready])
        except Exception as error:  # the server is restarting or overloaded: the next poll tries again
            self._complain_once("server", f"cannot look up case runs: {type(error).__name__}: {error}")
            return
        self._said.pop("server", None)
        for case in ready:
            try:
                self._handle(case, existing.get(case.key))
            except Exception as error:  # a bad folder or a failed API call must not stop the sensor
                self._complain_once(
                    str(case.folder.path),
                    f"case {case.folder.name} ({case.folder.path}): {type(error).__name__}: {error}",
                )

    def _handle(self, case: ReadyCase, run: FlowRun | None) -> None:
        """Start a run for new content; for content that has one, resume it if it crashed.

        A crashed run (the worker or the service stopped under it) is resumed the first
        time this sensor sees its case: after a restart, for every case that was cut short.
        """
        if run is not None:
            self.watcher.settle(case)
            if run.state_type == StateType.CRASHED:
                self.client.set_flow_run_state(
                    run.id, AwaitingRetry(message="resumed by the file sensor: the run had crashed")
                )
                self.logger.info("case %s: run %s had crashed; resumed", case.folder.name, run.name)
            return
        verdict = self.watcher.verdict(case)
        if verdict == "wait":
            return
        if verdict == "report":
            self._report_waiting(case)
            return
        inspection = self.watcher.inspection(case)
        if inspection.problems:
            self.logger.warning(
                "case %s has %d problem(s); its run will fail at discovery:\n  %s",
                case.folder.name,
                len(inspection.problems),
                "\n  ".join(inspection.problems),
            )
        room = room_tag(case.folder, inspection)
        run = start_case_run(
            self.settings, case.folder.path, trigger="sensor", room=room, key=case.key, config=self.config
        )
        self.watcher.settle(case)
        self._said.pop(str(case.folder.path), None)
        emit_event(
            event="mqi.case.detected",
            resource=_case_resource(case),
            related=[
                {
                    "prefect.resource.id": f"prefect.flow-run.{run.id}",
                    "prefect.resource.role": "case-run",
                    "prefect.resource.name": run.name,
                }
            ],
            payload={"key": case.key, "files": case.files, "ready_by": case.by, "room": room},
        )
        self.logger.info(
            "case %s ready (%s, %d files): run %s started", case.folder.name, case.by, case.files, run.name
        )

    def _report_waiting(self, case: ReadyCase) -> None:
        waiting = self.watcher.waiting(case)
        assert waiting is not None, "the watcher reports only cases that wait"
        waited = self.settings.sensor.settle_seconds + self.settings.sensor.incomplete_report_seconds
        message = (
            f"case {case.folder.name} ({case.folder.path}) is ready ({case.by}) but {waiting.text} "
            f"after {waited:g} s; not run: it runs once that is over"
        )
        self.logger.warning(message)
        emit_event(
            event="mqi.case.incomplete",
            resource=_case_resource(case),
            payload={
                "key": case.key,
                "reason": waiting.kind,
                "waited_seconds": waited,
                "message": message,
                **waiting.details,
            },
        )


@flow(name="file-sensor", log_prints=False)
def file_sensor(config: str | None = None) -> None:
    """Watch the scan folder until cancelled; start one case run per ready case content."""
    settings = load_settings(config)
    logger = get_run_logger()
    sensor = settings.sensor
    readiness = f"marker {settings.case.ready_marker}" + (
        f" or {sensor.quiet_seconds:g} s without changes" if sensor.quiet_seconds else ""
    )
    logger.info("watching %s every %g s (ready: %s)", settings.scan_dir, sensor.poll_seconds, readiness)
    with api_client() as client:
        watcher = FileSensor(settings, client, config)
        while True:
            watcher.poll()
            time.sleep(sensor.poll_seconds)
