"""GPU scheduling benchmark: many case flows competing for a few GPUs.

Submits CASES case runs of BEAMS beams at once, with the stand-in engine
taking exactly D seconds on GPU_COUNT virtual GPUs, in one of two ways:

- `--via up` (default, the production path): `mqi up` runs the service and
  the CASES ready case folders are written into its scan folder at once; the
  sensor starts the runs, the warm worker runs them (at most one case run per
  GPU at a time, the rest queued);
- `--via processes`: a bare Prefect server with the project's settings and
  one `mqi run` process per case, all started at once (every case competes
  for the GPUs, and for this machine's CPUs, from the start).

From the engine's launch records it prints:

- makespan: first engine start -> last engine end (the GPUs' busy window);
- ideal makespan: ceil(beams / GPUs) * D, and the ratio (goal <= 1.10);
- the gap between one engine exiting and the next starting on the same GPU:
  median and max (goal: median <= 0.5 s);
- the GPUs' idle time, split into time a beam waited for a GPU (what leasing
  costs) and time no beam waited (cases not started or not yet interpreted).

With `--backend slurm` the same run is done twice, first on the local backend (the
baseline), then with every beam a Slurm job on a single-node Slurm started for it
(tests/slurm.py: fake GPUs, SchedulerParameters as a site should set them), and
both sets of figures are printed.

Usage: python benchmarks/scheduling.py [--via up|processes] [--backend local|slurm] [--cases 10] [--beams 4]
       [--gpus 4] [--duration 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.mqi_up import mqi_up, wait  # noqa: E402
from standins.sample_case import write_sample_case  # noqa: E402
from tests.local_server import LocalServer  # noqa: E402
from tests.slurm import SCHEDULER_PARAMETERS, SlurmCluster  # noqa: E402


def bench_config(gpus: int, backend: str = "local") -> dict:
    config = {
        "engine": {"poll_seconds": 0.2, "retries": 0},
        "tps": {"phantom": {"dims": [40, 40, 40], "unit_mm": [5.0, 5.0, 5.0]}},
        "backend": {"kind": backend, "host": "bench", "gpus": list(range(gpus))},
    }
    if backend == "slurm":
        config["slurm"] = {"poll_seconds": 1.0}
    return config


Outcome = tuple[list[str], float, dict[str, float]]  # failed runs, seconds taken, wait starts


def run_processes(root: Path, args: argparse.Namespace, env: dict[str, str]) -> Outcome:
    """One `mqi run` process per case against a bare server."""
    (root / "home").mkdir()
    (root / "data" / "engine").mkdir(parents=True)
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump({"data_root": str(root / "data"), **bench_config(args.gpus, args.backend)})
    )
    server = LocalServer(root / "home")
    server.start()
    try:
        cases = [
            write_sample_case(root / "data" / "scan", f"BENCH{k:02d}", beams=args.beams)
            for k in range(args.cases)
        ]
        submitted = time.time()
        runs = [
            subprocess.Popen(
                [sys.executable, "-m", "deployments.cli", "--config", str(config), "run", str(case)],
                env={**server.env(), **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for case in cases
        ]
        failed = [case.name for case, run in zip(cases, runs, strict=True) if run.wait() != 0]
        taken = time.time() - submitted
        with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            return failed, taken, wait_starts(client, client.read_flow_runs())
    finally:
        server.stop()


def run_service(root: Path, args: argparse.Namespace, env: dict[str, str]) -> Outcome:
    """Ready case folders written at once into `mqi up`'s scan folder."""
    names = [f"BENCH{k:02d}" for k in range(args.cases)]
    with mqi_up(root, bench_config(args.gpus, args.backend), env=env) as api:
        submitted = time.time()
        for name in names:
            write_sample_case(root / "data" / "scan", name, beams=args.beams)
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:

            def finished() -> list[FlowRun] | None:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names))
                )
                done = [run for run in runs if run.state is not None and run.state.is_final()]
                return done if len(done) == len(names) else None

            # Seldom: the harness's own reads load the server the case runs share.
            runs = wait(f"{len(names)} case runs to finish", finished, timeout=1800, poll=2.0)
            taken = max(run.end_time.timestamp() for run in runs if run.end_time) - submitted
            waits = wait_starts(client, runs)
    return [f"{run.name}: {run.state.message}" for run in runs if not run.state.is_completed()], taken, waits


def wait_starts(client: SyncPrefectClient, runs: list[FlowRun]) -> dict[str, float]:
    """When each beam's simulate task started, i.e. began to wait for a GPU: '<case>/beam-NN' -> time."""
    case_of = {run.id: run.name for run in runs}
    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(case_of))),
        task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="simulate beam")),
    )
    return {
        f"{case_of[task.flow_run_id]}/beam-{int(task.name.split()[-1]):02d}": task.start_time.timestamp()
        for task in tasks
        if task.start_time is not None
    }


Span = tuple[float, float, str]  # engine start, end, '<case>/beam-NN'


def engine_spans(launch_log: Path) -> dict[str, list[Span]]:
    """Every engine run per GPU, from the stand-in's launch records, in start order."""
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    starts = {r["pid"]: r for r in records if r["tool"] == "engine" and r["event"] == "start"}
    ends = {r["pid"]: r["time"] for r in records if r["tool"] == "engine" and r["event"] == "end"}
    spans: dict[str, list[Span]] = defaultdict(list)
    for pid, start in starts.items():
        beam = Path(start["input"]).parents[2]  # <work>/<case>/beams/beam-NN/jobs/<hash>/moqui_tps.in
        gpu = start.get("cuda_visible_devices") or str(start["gpu"])  # Slurm's choice, else GPUID
        spans[gpu].append((start["launched"], ends[pid], f"{beam.parents[1].name}/{beam.name}"))
    return {gpu: sorted(s) for gpu, s in spans.items()}


def idle_split(spans: dict[str, list[Span]], waits: dict[str, float], gpus: int) -> tuple[float, float]:
    """GPU-seconds idle within the makespan: (while a beam waited for a GPU, while none did).

    The first is what the leasing costs (hand-off latency); the second is GPUs with no
    work yet (cases still starting up, interpreting, or queued behind the running-case
    limit). Sampled every 10 ms; a beam waits from its simulate task's start to its launch.
    """
    runs = [span for s in spans.values() for span in s]
    launched = {beam: start for start, _, beam in sorted(runs, reverse=True)}  # first launch
    waiting = [(waits[beam], launched[beam]) for beam in launched if beam in waits]
    first, last = min(r[0] for r in runs), max(r[1] for r in runs)
    step, latency, starved = 0.01, 0.0, 0.0
    for k in range(int((last - first) / step)):
        t = first + k * step
        idle = gpus - sum(start <= t < end for start, end, _ in runs)
        queued = sum(since <= t < until for since, until in waiting)
        latency += min(idle, queued) * step
        starved += (idle - min(idle, queued)) * step
    return latency, starved


def measure(root: Path, args: argparse.Namespace) -> int:
    """One run on args.backend under `root`: print its figures."""
    root.mkdir(parents=True, exist_ok=True)
    launch_log = root / "launches.jsonl"
    env = {"MQI_STANDIN_LAUNCH_LOG": str(launch_log), "MQI_STANDIN_ENGINE_DURATION": str(args.duration)}
    print(f"-- {args.backend} backend; load average before: {os.getloadavg()[0]:.2f}")
    failed, taken, waits = (run_service if args.via == "up" else run_processes)(root, args, env)
    if failed:
        print(f"some case runs failed: {failed}")
        return 1
    spans = engine_spans(launch_log)
    if args.keep_log:
        shutil.copy(launch_log, args.keep_log.with_suffix(f".{args.backend}.jsonl"))

    total = sum(len(s) for s in spans.values())
    first = min(s[0][0] for s in spans.values())
    last = max(end for s in spans.values() for _, end, _ in s)
    makespan = last - first
    ideal = math.ceil(total / args.gpus) * args.duration
    gaps = [b[0] - a[1] for s in spans.values() for a, b in zip(s, s[1:], strict=False)]
    latency, starved = idle_split(spans, waits, args.gpus)
    print(
        f"{args.cases} cases x {args.beams} beams = {total} engine runs of {args.duration:g} s "
        f"on {args.gpus} GPUs"
    )
    print(
        f"submission -> last case finished: {taken:.1f} s "
        f"(includes detection, flow start-up, interpreter, conversion)"
    )
    print(f"makespan (first engine start -> last engine end): {makespan:.1f} s")
    print(f"ideal makespan ceil({total}/{args.gpus}) x {args.duration:g}: {ideal:.1f} s")
    ratio = makespan / ideal
    goal = 1.15 if args.backend == "slurm" else 1.10
    print(f"ratio: {ratio:.3f}  (goal <= {goal:.2f}: {'PASS' if ratio <= goal else 'FAIL'})")
    if gaps:
        median = statistics.median(gaps)
        print(
            f"gap between engines on one GPU: median {median:.3f} s, max {max(gaps):.3f} s "
            f"(goal median <= 0.5 s: {'PASS' if median <= 0.5 else 'FAIL'})"
        )
    print(
        f"GPU idle within the makespan: {latency + starved:.1f} GPU-s; with a beam waiting "
        f"(hand-off latency) {latency:.1f}, with none waiting (no work yet) {starved:.1f}"
    )
    print("runs per GPU: " + ", ".join(f"GPU {g}: {len(s)}" for g, s in sorted(spans.items())))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--via", choices=["up", "processes"], default="up")
    parser.add_argument("--backend", choices=["local", "slurm"], default="local")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--keep-log", type=Path, help="copy the stand-in launch records here, for analysis")
    args = parser.parse_args()

    print(f"{os.cpu_count()} CPUs; via {args.via}")
    with tempfile.TemporaryDirectory(prefix="mqi-sched-") as tmp:
        if args.backend == "local":
            return measure(Path(tmp), args)
        code = measure(Path(tmp) / "local", argparse.Namespace(**{**vars(args), "backend": "local"}))
        cluster = SlurmCluster(Path(tmp) / "slurm", gpus=args.gpus)
        cluster.start()
        os.environ.update(cluster.env())  # sbatch and squeue in every process of the run
        try:
            print(f"Slurm: SchedulerParameters={SCHEDULER_PARAMETERS}")
            return code or measure(Path(tmp) / "slurm-run", args)
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
