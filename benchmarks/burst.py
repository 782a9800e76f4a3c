"""Burst benchmark: many cases submitted at once, on SQLite and on PostgreSQL, one and two workers.

CASES ready case folders of BEAMS beams are written at once into the scan folder of a
running service; the stand-in engine takes exactly D seconds on each of GPUS stand-in
GPUs. Rows, side by side in one run (the first is the baseline):

- sqlite+1 worker: `mqi up` with its SQLite server;
- postgres+1 worker: `mqi up` with `server.database` on a PostgreSQL started here
  (initdb + pg_ctl in a temporary folder, as tests/postgres.py does);
- postgres+2 workers: the same plus `mqi up --no-server` as a second machine (its own
  server.machine and PREFECT_HOME, the same shared data root and GPU node).

Per row: makespan (first engine start -> last engine end) / ideal ceil(beams/GPUs) x D;
lost runs (cases without a Completed run) and duplicated ones (cases with more than one
run, beams whose engine was launched more than once); p50/p95 of the GPU hand-off gap (one
engine's end to the next start on that GPU); p95 of a lease acquisition on the server
(a probe in this process takes and releases a GPU-like limit of its own every 0.5 s
with the client the beams use, timed); the server's CPU seconds per case (the Prefect
server's process tree, plus PostgreSQL's); and the server calls per case by endpoint, from
the server's access log (PREFECT_SERVER_LOGGING_LEVEL=INFO), the busiest first (the probe's
own calls taken out; this script's own reads, every 5 s, left in). Calls the server refused
with 503 (a busy database: the client asks again) are counted apart, as refused: they
measure the database's contention, not what a case asks for.

Usage: python benchmarks/burst.py [--cases 100] [--beams 4] [--gpus 10] [--duration 20]
       [--rows sqlite+1,postgres+1,postgres+2]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.mqi_up import wait  # noqa: E402
from benchmarks.scheduling import engine_spans  # noqa: E402
from deployments.processes import descendants, stop_tree  # noqa: E402
from standins.sample_case import write_sample_case  # noqa: E402
from tests.local_server import free_port  # noqa: E402
from tests.postgres import Postgres  # noqa: E402

ROWS = ["sqlite+1", "postgres+1", "postgres+2"]
ACCESS = re.compile(r'"(GET|POST|PATCH|PUT|DELETE) (/api/[^ ?"]*)[^"]*" (\d{3})')
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PROBE_HOST = "burst-probe"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (children already reaped count in cutime/cstime)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15]) / TICKS
    return total


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


@dataclass
class Row:
    name: str
    ratio: float = 0.0
    lost: int = 0
    duplicated: int = 0
    gaps: list[float] = field(default_factory=list)
    leases: list[float] = field(default_factory=list)
    cpu_per_case: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    refused: int = 0


def endpoint(path: str) -> str:
    return UUID.sub("{id}", path)


def start_up(root: Path, config: Path, env: dict[str, str], *options: str) -> subprocess.Popen[bytes]:
    mqi = str(Path(sys.executable).with_name("mqi"))
    out = (root / "up.out").open("ab")
    return subprocess.Popen(
        [mqi, "--config", str(config), "up", *options],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_up(process: subprocess.Popen[bytes], out: Path) -> None:
    def up() -> bool:
        if process.poll() is not None:
            raise SystemExit(f"mqi up exited with {process.returncode}:\n{out.read_text()[-3000:]}")
        return "is up" in out.read_text()

    wait(f"mqi up ({out})", up, timeout=600, poll=0.5)


@contextmanager
def postgres() -> Iterator[tuple[str, Postgres]]:
    database = Postgres()
    database.init()
    database.start()
    try:
        yield database.create_database("prefect"), database
    finally:
        database.remove()


def postmaster(database: Postgres) -> int:
    return int((database.data / "postmaster.pid").read_text().split()[0])


def lease_probe(api: str, stop: threading.Event, timings: list[float]) -> None:
    """Take and release a GPU limit of its own every 0.5 s with the client the beams use, timed."""
    from tasks.gpu.limits import ensure_gpu_limits
    from tasks.gpu.pool import GpuPool
    from tasks.prefect_api.client import api_client
    from tasks.prefect_api.internals import granted_lease

    pool = GpuPool(host=PROBE_HOST, gpus=(0,), lease_seconds=60)
    with temporary_settings({PREFECT_API_URL: api}):
        ensure_gpu_limits(pool)
        with api_client() as client:
            while not stop.wait(0.5):
                started = time.perf_counter()
                response = client.increment_concurrency_slots_with_lease(
                    names=[pool.limit_name(0)], slots=1, mode="concurrency", lease_duration=60
                )
                timings.append(time.perf_counter() - started)
                client.release_concurrency_slots_with_lease(granted_lease(response))


def run_row(name: str, root: Path, args: argparse.Namespace) -> Row:
    row = Row(name)
    kind, workers = name.split("+")
    root.mkdir(parents=True)
    launch_log = root / "launches.jsonl"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env = {
        **base,
        "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
        "MQI_STANDIN_ENGINE_DURATION": str(args.duration),
        "PREFECT_SERVER_LOGGING_LEVEL": "INFO",  # the access log: one line per server call
    }
    config = {
        "data_root": str(root / "data"),
        "engine": {"poll_seconds": 0.2, "retries": 0},
        "tps": {"phantom": {"dims": [40, 40, 40], "unit_mm": [5.0, 5.0, 5.0]}},
        "backend": {"host": "bench", "gpus": list(range(args.gpus))},
        "dicom": {"validator": None},
        "server": {"machine": "machine-a"},
    }
    names = [f"BURST{k:03d}" for k in range(args.cases)]
    with ExitStack() as stack:
        database = None
        if kind == "postgres":
            url, database = stack.enter_context(postgres())
            config["server"]["database"] = url
        config_a = root / "a.yaml"
        config_a.write_text(yaml.safe_dump(config))
        machine_a = root / "machine-a"
        machine_a.mkdir()
        up_a = start_up(machine_a, config_a, env, "--port", str(port))
        stack.callback(lambda: (stop_tree(up_a.pid), up_a.wait()))
        wait_up(up_a, machine_a / "up.out")
        ups = [up_a]
        if workers == "2":
            config_b = root / "b.yaml"
            config_b.write_text(
                yaml.safe_dump({**config, "server": {**config["server"], "machine": "machine-b"}})
            )
            machine_b = root / "machine-b"
            machine_b.mkdir()
            env_b = {**env, "PREFECT_HOME": str(machine_b / "prefect-home")}
            up_b = start_up(machine_b, config_b, env_b, "--no-server", "--api", api)
            stack.callback(lambda: (stop_tree(up_b.pid), up_b.wait()))
            wait_up(up_b, machine_b / "up.out")
            ups.append(up_b)
        server_log = root / "data" / "logs" / "server.log"
        [server] = [
            pid
            for pid in descendants(up_a.pid)
            if b"\0server\0start" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

        def servers() -> list[int]:
            """The Prefect server's processes, and PostgreSQL's."""
            return tree(server) + (tree(postmaster(database)) if database else [])

        cpu_before = cpu_seconds(servers())
        log_offset = server_log.stat().st_size
        stop = threading.Event()
        probe = threading.Thread(target=lease_probe, args=(api, stop, row.leases), daemon=True)
        probe.start()
        for case_id in names:
            write_sample_case(root / "data" / "scan", case_id, beams=args.beams)
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:

            def finished() -> list | None:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names))
                )
                done = [run for run in runs if run.state is not None and run.state.is_final()]
                return runs if len({run.name for run in done}) == len(names) else None

            runs = wait(f"{len(names)} case runs to finish", finished, timeout=7200, poll=5.0)
        stop.set()
        probe.join(timeout=30)
        row.cpu_per_case = (cpu_seconds(servers()) - cpu_before) / len(names)
        with server_log.open("rb") as log:
            log.seek(log_offset)
            for line in log.read().decode(errors="replace").splitlines():
                if (match := ACCESS.search(line)) and match[3] == "503":
                    row.refused += 1
                elif match:
                    row.calls[f"{match[1]} {endpoint(match[2])}"] += 1
        for call in (
            "increment-with-lease",
            "decrement-with-lease",
        ):  # the probe's own calls are not the cases'
            row.calls[f"POST /api/v2/concurrency_limits/{call}"] -= len(row.leases)
    completed = Counter(run.name for run in runs if run.state.is_completed())
    row.lost = sum(1 for case_id in names if completed[case_id] == 0)
    per_case = Counter(run.name for run in runs)
    spans = engine_spans(launch_log)
    beams = Counter(beam for on_gpu in spans.values() for _, _, beam in on_gpu)
    row.duplicated = sum(1 for count in per_case.values() if count > 1) + sum(
        1 for count in beams.values() if count > 1
    )
    first = min(on_gpu[0][0] for on_gpu in spans.values())
    last = max(end for on_gpu in spans.values() for _, end, _ in on_gpu)
    total = sum(len(on_gpu) for on_gpu in spans.values())
    row.ratio = (last - first) / (math.ceil(total / args.gpus) * args.duration)
    row.gaps = [b[0] - a[1] for on_gpu in spans.values() for a, b in zip(on_gpu, on_gpu[1:], strict=False)]
    return row


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=10)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated, of " + ", ".join(ROWS))
    parser.add_argument("--calls", type=int, default=12, help="endpoints listed per row (12)")
    parser.add_argument("--workdir", type=Path, help="keep every row's files (logs, launch records) here")
    args = parser.parse_args()
    rows = args.rows.split(",")
    print(
        f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}; {args.cases} cases x "
        f"{args.beams} beams on {args.gpus} stand-in GPUs, engine time {args.duration:g} s"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="mqi-burst-") as tmp:
        for name in rows:
            results.append(run_row(name, (args.workdir or Path(tmp)) / name, args))
            print(f"{name}: done", flush=True)
    baseline = results[0]
    print(
        f"{'row':<20} {'makespan/ideal':>14} {'lost':>5} {'dup':>4} {'gap p50':>8} {'gap p95':>8} "
        f"{'lease p95':>10} {'srv CPU s/case':>15} {'calls/case':>11}"
    )
    for row in results:
        print(
            f"{row.name + ' worker' + ('s' if row.name.endswith('2') else ''):<20} {row.ratio:>14.3f} "
            f"{row.lost:>5} {row.duplicated:>4} "
            f"{quantile(row.gaps, 0.5):>8.3f} {quantile(row.gaps, 0.95):>8.3f} "
            f"{quantile(row.leases, 0.95):>10.3f} {row.cpu_per_case:>15.2f} "
            f"{sum(row.calls.values()) / args.cases:>11.1f}"
        )
    for row in results:
        print(
            f"{row.name}: ratio {row.ratio / baseline.ratio:.3f} x {baseline.name}'s; "
            f"server calls per case by endpoint ({row.refused / args.cases:.1f} more refused with 503):"
        )
        for call, count in row.calls.most_common(args.calls):
            print(f"  {count / args.cases:8.2f}  {call}")
    last = results[-1]
    print(f"{last.name} workers: ratio={last.ratio:.3f} lost={last.lost} duplicated={last.duplicated}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
