"""The file sensor flow: every ready case folder in the scan folder becomes exactly one case run.

Prefect has no filesystem sensor, so this long-running flow (its own deployment, "the
file sensor" in the UI) polls the scan folder. Polling, not inotify: the scan folder is
often a network share, where inotify never hears of files written by another host, and
a poll that reads only folder timestamps is cheap enough to run twice a second (a full
re-read of every case's files every `sensor.rescan_seconds` is the safety net for files
rewritten in place). Exactly once: each run is created with an idempotency key made
from the folder's content, so the server returns the existing run for content it has
seen, whatever duplicate file events or restarts happen; a changed folder has a new key
and runs again. Nothing in the scan folder is ever written. Case runs that crashed (a lost
worker machine, a stopped service) are run again (`FileSensor.resume_crashed`).
"""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID, uuid4

from prefect import flow
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterIdempotencyKey,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events import emit_event
from prefect.logging import get_run_logger

from config import load_settings
from config.settings import Settings
from tasks.prefect_api.case_turn import active_case_runs
from tasks.prefect_api.client import api_client
from tasks.prefect_api.resume import resume_if_crashed
from tasks.scanfolder.folders import room_tag, shown
from tasks.scanfolder.watcher import CaseWatcher, ReadyCase

KEY_LOOKUP_CHUNK = 100  # idempotency keys per query when matching ready cases to existing runs
CREATION_LABEL = "mqi.creation"  # a case run's label: which start_case_run call made it
RESUME_CHECK_SECONDS = 5  # how often crashed case runs are looked for


def start_case_run(
    settings: Settings,
    case_dir: Path,
    *,
    trigger: str,
    room: str | None,
    key: str | None = None,
    config: str | None = None,
    extra: dict[str, object] | None = None,
    deployment_id: UUID | None = None,
) -> tuple[FlowRun, bool]:
    """Create a run of the case deployment, named after the case and tagged with room and trigger;
    return it and whether this call made it.

    The one place case runs are created (the sensor and `mqi rerun`). `key` makes the
    creation idempotent: a run another sensor made first for the same content is returned
    instead (it carries that sensor's creation label, not ours). `config` is passed only
    when given, else the worker's MQI_CONFIG applies. `deployment_id`, when the caller
    knows it, saves reading the deployment.
    """
    parameters: dict[str, object] = {"case_dir": str(case_dir), **(extra or {})}
    if config is not None:
        parameters["config"] = config
    creation = uuid4().hex
    with api_client() as client:  # a busy server is asked again at once, not after seconds
        if deployment_id is None:
            deployment_id = client.read_deployment_by_name(settings.sensor.case_deployment).id
        run = client.create_flow_run_from_deployment(  # a run of its own, not a child of the sensor's
            deployment_id,
            parameters=parameters,
            name=case_dir.name,
            tags=[tag for tag in (room, f"trigger:{trigger}") if tag],
            idempotency_key=key,
            labels={CREATION_LABEL: creation},
        )
    return run, run.labels.get(CREATION_LABEL) == creation


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
        self._next_resume_check = 0.0
        self._case_deployment: UUID | None = None

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
                self._case_deployment = None  # perhaps deleted and made anew: read it again
                self._complain_once(
                    str(case.folder.path),
                    f"case {case.folder.name} ({case.folder.path}): {type(error).__name__}: {error}",
                )

    def case_deployment(self) -> UUID:
        """The case deployment's id, read once (a redeploy keeps it) and again after any failed call."""
        if self._case_deployment is None:
            name = self.settings.sensor.case_deployment
            self._case_deployment = self.client.read_deployment_by_name(name).id
        return self._case_deployment

    def resume_crashed(self) -> None:
        """Run crashed case runs again (tasks/prefect_api/resume.py), every RESUME_CHECK_SECONDS.

        A run crashes when its worker machine is lost (its heartbeats stop), its worker is
        killed or the service stops under it; the first check after a start finds every
        run that was cut short meanwhile.
        """
        now = time.monotonic()
        if now < self._next_resume_check:
            return
        self._next_resume_check = now + RESUME_CHECK_SECONDS
        try:
            crashed = self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[self.case_deployment()]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
                ),
            )
            for run in crashed:
                if str(run.id) in self._said:  # not resumed before, for a reason that lasts
                    continue
                reason = resume_if_crashed(self.client, run, by="the file sensor")
                if reason is None:
                    self.logger.info("case run %s had crashed (%s); resumed", run.name, run.state.message)
                else:
                    self._complain_once(str(run.id), f"case run {run.name} crashed, not resumed: {reason}")
        except Exception as error:  # the server is restarting or overloaded: the next check tries again
            self._complain_once("resume", f"cannot resume crashed runs: {type(error).__name__}: {error}")
            return
        self._said.pop("resume", None)

    def _handle(self, case: ReadyCase, run: FlowRun | None) -> None:
        """Start a run for new content that has none."""
        if run is not None:  # crashed runs are resumed by `resume_crashed`
            self.watcher.settle(case)
            return
        verdict = self.watcher.verdict(case)
        if verdict == "wait" or self._wait_once(case):
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
        run, created = start_case_run(
            self.settings,
            case.folder.path,
            trigger="sensor",
            room=room,
            key=case.key,
            config=self.config,
            deployment_id=self.case_deployment(),
        )
        self.watcher.settle(case)
        self._said.pop(str(case.folder.path), None)
        if not created:  # another sensor on this server started it a moment ago, and announced it
            self.logger.debug("case %s: run %s was started by another sensor", case.folder.name, run.name)
            return
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

    def _wait_once(self, case: ReadyCase) -> bool:
        """Whether new content of a case waits for the case's active run to end (said once).

        One run of a case at a time: content changed under a running case (a delivery
        added, a plan replaced) runs once that run has ended, not beside it.
        """
        active = active_case_runs(self.client, self.flow_name, case.folder.path)
        if not active:
            return False
        names = ", ".join(run.name for run in active)
        self._complain_once(
            str(case.folder.path),
            f"case {case.folder.name} changed while its run {names} is active; "
            "the new content runs once that run has ended",
        )
        return True

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


@flow(name="file-sensor", flow_run_name="sensor", log_prints=False)
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
            watcher.resume_crashed()
            time.sleep(sensor.poll_seconds)
