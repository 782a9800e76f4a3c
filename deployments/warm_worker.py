"""A process worker whose flow runs start warm: forked from a process that has imported Prefect.

Prefect's process worker starts every flow run as a new Python interpreter
(`python -m prefect.engine`) that imports Prefect and the flow before the run is even
Running: about 2.5 s of CPU on a 2-core host, most of the time from a ready marker to a
running case. This worker forks each flow run from a multiprocessing fork server that
imported all of that once, at start-up. The child still runs `prefect.engine` as
`__main__`, with the run's environment and working folder: pull steps, flow loading,
states and signal handling are all Prefect's own; only the start-up differs. Two
things differ from the stock worker: Prefect settings given in a run's job variables
are not re-read (the fork server read them at start-up; MQI_* variables and the tools'
environment do apply), and changes to code under tasks/ or config/ take effect when the
worker restarts (the flow file itself is loaded afresh by every run). Both the worker
and the runs' engines talk to the server through a client that retries a busy SQLite
server within milliseconds (tasks/prefect_api/client.py).

    python -m deployments.warm_worker --pool mqi [--name NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import sys
import time
import warnings
from functools import partial
from uuid import UUID

import anyio
import anyio.abc
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from config import load_settings
from deployments.cancel import cancelled_message, run_settings
from deployments.processes import stop_tree
from tasks.backends.cancel import stop_case_jobs
from tasks.prefect_api.client import async_api_client, flow_run_client_context
from tasks.prefect_api.internals import mark_flow_run_cancelled, replace_worker_client, set_up_lines_at_debug
from tasks.prefect_api.secrets import secret_value

# What every flow run imports anyway: imported once, in the fork server.
PRELOAD = ["prefect.engine", "prefect.flow_engine", "flows.case", "flows.sensor", "flows.gpu_monitor"]
FORKSERVER = multiprocessing.get_context("forkserver")
CANCEL_POLL_SECONDS = 2.0  # how often each run's watcher asks whether its run is Cancelling
CANCEL_READ_FRESH_SECONDS = 1.0  # one read of which runs are Cancelling serves every watcher this long


class CancellingRuns:
    """Which of the runs this worker runs are Cancelling: one read for all of them, shared by
    their watchers, instead of one read of each run every CANCEL_POLL_SECONDS (20 running
    cases were 10 reads a second on the server every case run shares)."""

    def __init__(self) -> None:
        self.watched: set[UUID] = set()
        self._lock = anyio.Lock()
        self._read_at = -math.inf
        self._found: dict[UUID, FlowRun] = {}

    async def get(self, client: PrefectClient, run_id: UUID) -> FlowRun | None:
        """`run_id`'s run if it is Cancelling, from a read at most CANCEL_READ_FRESH_SECONDS old."""
        async with self._lock:
            if time.monotonic() - self._read_at >= CANCEL_READ_FRESH_SECONDS:
                runs = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=sorted(self.watched)),
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
                    )
                )
                self._found, self._read_at = {run.id: run for run in runs}, time.monotonic()
        return self._found.get(run_id)


def run_engine(flow_run_id: str, env: dict[str, str], cwd: str | None) -> None:
    """In the forked child: `python -m prefect.engine` for this flow run, minus the interpreter start."""
    os.setpgid(0, 0)  # a group of its own, so cancelling it cannot touch the worker or other runs
    os.environ.update(env)
    os.environ["PREFECT__FLOW_RUN_ID"] = flow_run_id
    os.environ["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] = "false"  # as the stock worker sets
    if cwd:
        os.chdir(cwd)
    sys.argv = ["prefect.engine"]
    set_up_lines_at_debug()
    with flow_run_client_context():  # the engine's client, and the run's own calls': ours
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


# It serves process pools, so it keeps the worker type "process"; Prefect warns that the
# subclass takes the registry entry of that type in this process, which is what we want.
warnings.filterwarnings("ignore", message="Type 'WarmProcessWorker' .* key 'process'", category=UserWarning)


class WarmProcessWorker(ProcessWorker):
    """The process worker (same pools, job template and states) with forked flow-run processes."""

    async def setup(self) -> None:
        """Prefect's setup, then a client that asks a busy SQLite server again at once.

        Prefect's client waits 2, 4, 8, ... s after a 503; measured under load, a run
        sat Pending for 30 s that way, holding one of the running-case places.
        """
        await super().setup()
        await replace_worker_client(self, async_api_client())
        self._cancelling = CancellingRuns()

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        env = {key: value for key, value in configuration.env.items() if value is not None}
        cwd = str(configuration.working_dir) if configuration.working_dir else None
        process = FORKSERVER.Process(target=run_engine, args=(str(flow_run.id), env, cwd))
        process.start()
        if task_status is not None:
            task_status.started(process.pid)
        async with anyio.create_task_group() as group:
            group.start_soon(self._cancel_when_asked, flow_run.id, process.pid)
            await anyio.to_thread.run_sync(process.join, abandon_on_cancel=True)
            group.cancel_scope.cancel()
        return ProcessWorkerResult(status_code=process.exitcode or 0, identifier=str(process.pid))

    async def _cancel_when_asked(self, flow_run_id: UUID, pid: int) -> None:
        """Cancel in the UI: stop the run and every process below it (the tool it runs), then its
        engine jobs, and mark it Cancelled with what was stopped.

        Engine jobs a backend starts detached, to be adopted after a crash, are not below it:
        a case run's are stopped through their job records (deployments/cancel.py), after
        its process, so that nothing launches them again; Slurm jobs are scancelled
        (tasks/backends/cancel.py).
        """
        self._cancelling.watched.add(flow_run_id)
        try:
            while (run := await self._cancelling.get(self.client, flow_run_id)) is None:
                await anyio.sleep(CANCEL_POLL_SECONDS)
        finally:
            self._cancelling.watched.discard(flow_run_id)
        with anyio.CancelScope(shield=True):  # the run's end must not interrupt marking it
            await anyio.to_thread.run_sync(partial(stop_tree, pid, kill_root=True))
            message = None
            if "case_dir" in run.parameters:  # a case run: its engines too
                settings = run_settings(run, load_settings())
                message = await anyio.to_thread.run_sync(cancelled_message, settings, run)
                await anyio.to_thread.run_sync(self._stop_engine_jobs, run)
            await mark_flow_run_cancelled(self, run, message)

    def _stop_engine_jobs(self, run: FlowRun) -> None:
        """A scheduler's jobs (Slurm) outlive the run's process: scancel them; never fail the cancel."""
        if "case_dir" not in run.parameters:
            return
        try:
            stopped = stop_case_jobs(run.parameters, secret_value)
        except Exception as error:  # the run is still marked cancelled
            self._logger.warning("could not stop the engine jobs of run %s: %s", run.name, error)
            return
        if stopped:
            self._logger.info("run %s cancelled: stopped Slurm job(s) %s", run.name, " ".join(stopped))


async def serve(pool: str, name: str | None, queues: list[str] | None = None) -> None:
    set_up_lines_at_debug()
    FORKSERVER.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()  # pay for the imports now, not at the first case
    await WarmProcessWorker(work_pool_name=pool, name=name, work_queues=queues).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.warm_worker", description=__doc__)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name")
    parser.add_argument("--work-queue", action="append", help="poll only these queues (repeatable)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.pool, args.name, args.work_queue))


if __name__ == "__main__":
    main()
