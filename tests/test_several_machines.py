"""Two machines on one PostgreSQL server: `mqi up` on one, `mqi up --no-server` on the other.

Each "machine" is its own `mqi up` process tree with its own identity (server.machine)
and PREFECT_HOME; they share the case folders, outputs and results (the data root) and
one GPU node (the stand-in engines on this host, GPU limits gpu-node-<index> on the
server). Losing a machine is SIGKILLing every process of its tree at once; the engines it
launched run on the GPU node, detached, and survive, as jobs on an HPC node do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.objects import StateType

from config import load_settings
from deployments.processes import descendants
from deployments.server import REPO_ROOT
from tests.conftest import write_config
from tests.invariants import check_invariants, taken_gpu_slots, watch
from tests.local_server import LocalServer, pointed_at
from tests.service_stack import FAST, case_runs, finished, remove_deployments, small_case, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CASES = 20
ENGINE_SECONDS = "4"


class Machine:
    """One machine's `mqi up`, its output followed line by line."""

    def __init__(self, server: LocalServer, root: Path, config: Path, *options: str) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        env = {
            **server.env(),
            "PREFECT_HOME": str(root / "prefect-home"),
            "MQI_STANDIN_LAUNCH_LOG": str(root.parent / "launches.jsonl"),
            "MQI_STANDIN_ENGINE_DURATION": ENGINE_SECONDS,
        }
        self.log = root / "up.log"
        argv = [
            sys.executable,
            "-m",
            "deployments.cli",
            "--config",
            str(config),
            "up",
            "--api",
            server.api_url,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, *options],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"mqi up exited {self.proc.returncode}:\n{self.output()[-3000:]}"
            return "MQI Communicator is up" in self.output()

        wait_for(f"mqi up in {self.root}", up, timeout=300)

    def pids(self) -> set[int]:
        return {self.proc.pid, *descendants(self.proc.pid)}

    def lose(self) -> None:
        """The machine is gone: every process of its tree SIGKILLed at once (none can report)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.lose()


@pytest.fixture
def machines(postgres_server: LocalServer, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    overrides = {
        **FAST,
        "backend": {"host": "node", "gpus": [0, 1, 2, 3], "gpu_lease_seconds": 60},
        "sensor": {**FAST["sensor"], "max_running_cases": 6},
        "server": {"machine": "machine-a"},
    }
    config_a = write_config(tmp_path / "a", overrides)
    data = yaml.safe_load(config_a.read_text())
    config_b = tmp_path / "b" / "config.yaml"
    config_b.parent.mkdir()
    config_b.write_text(yaml.safe_dump({**data, "server": {"machine": "machine-b"}}))  # same data root
    with pointed_at(postgres_server):
        yield config_a, config_b
        remove_deployments()


def test_two_machines_share_the_burst_and_a_lost_one_is_made_good(postgres_server, machines, tmp_path):
    config_a, config_b = machines
    settings = load_settings(config_a, env={})
    a = Machine(postgres_server, tmp_path / "machine-a", config_a)
    b: Machine | None = None
    try:
        a.wait_up()
        b = Machine(postgres_server, tmp_path / "machine-b", config_b, "--no-server")
        b.wait_up()
        assert "worker:      mqi-machine-b" in b.output() and "file sensor:" not in b.output()

        ids = [f"MACH-{n:02d}" for n in range(CASES)]
        cases = [watch(small_case(settings.scan_dir, case_id)) for case_id in ids]

        def running_on_b() -> list:
            pids = {str(pid) for pid in b.pids()}
            return [
                run
                for run in case_runs(ids)
                if run.state_type == StateType.RUNNING and run.infrastructure_pid in pids
            ]

        lost = wait_for("case runs running on machine b", running_on_b, timeout=300)
        b.lose()

        def ended() -> list | None:  # Crashed is final too, but a lost machine's runs are resumed
            runs = finished(ids)
            return runs if runs and not any(run.state_type == StateType.CRASHED for run in runs) else None

        runs = wait_for("every case run to end", ended, timeout=600)
    finally:
        for machine in (b, a):
            if machine is not None:
                machine.stop()

    assert sorted(run.name for run in runs) == ids  # exactly one run per case
    by_id = {run.id: run for run in runs}
    for run in lost:  # the lost machine's runs were marked Crashed, resumed and finished elsewhere
        assert by_id[run.id].state_type == StateType.COMPLETED, by_id[run.id].state.message
        assert by_id[run.id].run_count >= 2
    wait_for("the lost machine's GPU leases to expire", lambda: taken_gpu_slots(settings) == {}, timeout=180)
    for case in cases:  # Completed, each beam's engine launched once, outputs intact, inputs unchanged
        check_invariants(
            settings, tmp_path / "launches.jsonl", case, state=StateType.COMPLETED, launches={2: 1}, done=(2,)
        )

    records = [json.loads(line) for line in (tmp_path / "launches.jsonl").read_text().splitlines()]
    engines = [record for record in records if record["tool"] == "engine"]
    ends = {record["pid"]: record["time"] for record in engines if record["event"] == "end"}
    spans = defaultdict(list)
    for record in engines:
        if record["event"] == "start":
            spans[record["gpu"]].append((record["launched"], ends[record["pid"]]))
    for gpu, on_gpu in spans.items():
        on_gpu.sort()
        for (_, end), (start, _) in zip(on_gpu, on_gpu[1:], strict=False):
            assert start >= end, f"two engines on GPU {gpu} at once"
