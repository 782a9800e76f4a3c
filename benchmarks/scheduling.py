"""GPU scheduling benchmark: many case flows competing for a few GPUs.

Starts a Prefect server with the project's settings, then submits CASES case
runs of BEAMS beams at once (one `mqi run` process per case, as a process
worker would), with the stand-in engine taking exactly D seconds on
GPU_COUNT virtual GPUs. From the engine's launch records it prints:

- makespan: first engine start -> last engine end (the GPUs' busy window);
- ideal makespan: ceil(beams / GPUs) * D, and the ratio (goal <= 1.10);
- the gap between one engine exiting and the next starting on the same GPU:
  median and max (goal: median <= 0.5 s).

Usage: python benchmarks/scheduling.py [--cases 10] [--beams 4] [--gpus 4] [--duration 5]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from standins.sample_case import write_sample_case  # noqa: E402
from tests.local_server import LocalServer  # noqa: E402


def write_config(root: Path, gpus: int) -> Path:
    config = {
        "data_root": str(root / "data"),
        "engine": {"poll_seconds": 0.2, "retries": 0},
        "tps": {"phantom": {"dims": [40, 40, 40], "unit_mm": [5.0, 5.0, 5.0]}},
        "backend": {"host": "bench", "gpus": list(range(gpus))},
    }
    (root / "data" / "engine").mkdir(parents=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def engine_spans(launch_log: Path) -> dict[str, list[tuple[float, float]]]:
    """(start, end) of every engine run per GPU, from the stand-in's launch records."""
    records = [json.loads(line) for line in launch_log.read_text().splitlines()]
    starts = {r["pid"]: r for r in records if r["tool"] == "engine" and r["event"] == "start"}
    ends = {r["pid"]: r["time"] for r in records if r["tool"] == "engine" and r["event"] == "end"}
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for pid, start in starts.items():
        spans[str(start["gpu"])].append((start["launched"], ends[pid]))
    return {gpu: sorted(s) for gpu, s in spans.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mqi-sched-") as tmp:
        root = Path(tmp)
        (root / "home").mkdir()
        server = LocalServer(root / "home")
        server.start()
        try:
            config = write_config(root, args.gpus)
            scan = root / "data" / "scan"
            cases = [write_sample_case(scan, f"BENCH{k:02d}", beams=args.beams) for k in range(args.cases)]
            launch_log = root / "launches.jsonl"
            env = {
                **server.env(),
                "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
                "MQI_STANDIN_ENGINE_DURATION": str(args.duration),
            }
            submitted = time.time()
            runs = [
                subprocess.Popen(
                    [sys.executable, "-m", "deployments.cli", "--config", str(config), "run", str(c)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for c in cases
            ]
            codes = [run.wait() for run in runs]
            finished = time.time()
        finally:
            server.stop()
        if any(codes):
            print(f"some case runs failed: exit codes {codes}")
            return 1
        spans = engine_spans(launch_log)

    total = sum(len(s) for s in spans.values())
    first = min(s[0][0] for s in spans.values())
    last = max(e for s in spans.values() for _, e in s)
    makespan = last - first
    ideal = math.ceil(total / args.gpus) * args.duration
    gaps = [b[0] - a[1] for s in spans.values() for a, b in zip(s, s[1:], strict=False)]
    print(
        f"{args.cases} cases x {args.beams} beams = {total} engine runs of {args.duration:g} s "
        f"on {args.gpus} GPUs"
    )
    print(
        f"submission -> last case finished: {finished - submitted:.1f} s "
        f"(includes process start-up, interpreter, conversion)"
    )
    print(f"makespan (first engine start -> last engine end): {makespan:.1f} s")
    print(f"ideal makespan ceil({total}/{args.gpus}) x {args.duration:g}: {ideal:.1f} s")
    ratio = makespan / ideal
    print(f"ratio: {ratio:.3f}  (goal <= 1.10: {'PASS' if ratio <= 1.10 else 'FAIL'})")
    if gaps:
        median = statistics.median(gaps)
        print(
            f"gap between engines on one GPU: median {median:.3f} s, max {max(gaps):.3f} s "
            f"(goal median <= 0.5 s: {'PASS' if median <= 0.5 else 'FAIL'})"
        )
    print("runs per GPU: " + ", ".join(f"GPU {g}: {len(s)}" for g, s in sorted(spans.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
