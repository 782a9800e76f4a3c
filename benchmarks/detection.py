"""Benchmark: ready marker written -> case flow run Running, against `mqi up`.

    python benchmarks/detection.py [--cases 20] [--beams 1] [--dir DIR]

Runs `mqi up` twice, each on a fresh data root and a free port: once as shipped (the
warm worker polling every 0.5 s), once as the baseline with Prefect's own process
worker at its default poll of 10 s (`--plain-worker --worker-poll 10`). Each time it
writes `--cases` ready sample cases into the scan folder one by one, each once the
previous case's run has finished, so every case is timed on an otherwise idle
service. The latency of a case is the timestamp of its run's Running state minus the
mtime of its ready marker (both this machine's clock, read from the server and the
file system, so the benchmark's own polling adds nothing). Printed per configuration:
median and p95 (nearest rank), and the median of each stage (marker -> run created by
the sensor -> picked up by the worker -> Running), with the load average, since other
work on the machine slows every stage.
Goals: median <= 3 s, p95 <= 6 s. Exit status 1 if the shipped configuration misses one.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings

from standins.sample_case import write_sample_case

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.mqi_up import mqi_up, wait

MEDIAN_GOAL = 3.0
P95_GOAL = 6.0
RUN_TIMEOUT = 300
SHIPPED = "mqi up (warm worker, poll 0.5 s)"
BASELINE = "baseline (Prefect process worker, poll 10 s)"
STAGES = ("SCHEDULED", "PENDING", "RUNNING")  # created by the sensor, taken by the worker, flow started


@dataclass
class Sample:
    case_id: str
    stages: dict[str, float]  # seconds from the marker to the first state of each type

    @property
    def latency(self) -> float:
        return self.stages["RUNNING"]


def case_run(client: SyncPrefectClient, case_id: str):
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[case_id])))
    return runs[0] if runs else None


def finished_run(client: SyncPrefectClient, run_id):
    run = client.read_flow_run(run_id)
    return run if run.state is not None and run.state.is_final() else None


def measure(client: SyncPrefectClient, scan: Path, case_id: str, beams: int) -> Sample:
    case = write_sample_case(scan, case_id, beams=beams, layers=4)
    marker = (case / "_CASE_READY").stat().st_mtime_ns / 1e9
    run = wait(f"a run of {case_id}", lambda: case_run(client, case_id), RUN_TIMEOUT)
    run = wait(f"{case_id} to finish", lambda: finished_run(client, run.id), RUN_TIMEOUT, poll=0.5)
    first: dict[str, float] = {}
    for state in sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp):
        first.setdefault(state.type.value, state.timestamp.timestamp() - marker)
    if not run.state.is_completed():
        print(f"  warning: {case_id} ended {run.state.name}: {run.state.message}", file=sys.stderr)
    return Sample(case_id, {stage: first[stage] for stage in STAGES})


def run_configuration(label: str, options: list[str], cases: int, beams: int, root: Path) -> list[Sample]:
    config = {
        "tps": {"phantom": {"dims": [40, 40, 40], "unit_mm": [5.0, 5.0, 5.0]}},
        "backend": {"host": f"bench-{label}", "gpus": [0, 1, 2]},
    }
    samples = []
    with mqi_up(root, config, options) as api:
        scan = root / "data" / "scan"
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            for n in range(cases):
                sample = measure(client, scan, f"DET-{label}-{n:02d}", beams)
                print(f"  {sample.case_id}: {sample.latency:.2f} s", flush=True)
                samples.append(sample)
    return samples


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def summary(label: str, samples: list[Sample]) -> tuple[float, float]:
    latencies = [s.latency for s in samples]
    median, high = statistics.median(latencies), p95(latencies)
    stages = ", ".join(
        f"{stage.lower()} {statistics.median(s.stages[stage] for s in samples):.2f} s" for stage in STAGES
    )
    print(
        f"{label}\n  n={len(samples)}  median {median:.2f} s  p95 {high:.2f} s  "
        f"min {min(latencies):.2f} s  max {max(latencies):.2f} s\n  median from the marker: {stages}"
    )
    return median, high


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--beams", type=int, default=1, help="treatment beams per sample case")
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mqi-detection-", dir=args.dir) as tmp:
        print(f"{os.cpu_count()} CPUs; {args.cases} cases of {args.beams} beam(s), one at a time")
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        print(f"{SHIPPED}:")
        shipped = run_configuration("fast", [], args.cases, args.beams, Path(tmp) / "fast")
        print(f"{BASELINE}:")
        plain = ["--plain-worker", "--worker-poll", "10"]
        baseline = run_configuration("default", plain, args.cases, args.beams, Path(tmp) / "default")
    print("load average after: {:.2f} {:.2f} {:.2f}\n".format(*os.getloadavg()))
    median, high = summary(SHIPPED, shipped)
    summary(BASELINE, baseline)
    ok = median <= MEDIAN_GOAL and high <= P95_GOAL
    print(f"goal median <= {MEDIAN_GOAL:g} s, p95 <= {P95_GOAL:g} s: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
