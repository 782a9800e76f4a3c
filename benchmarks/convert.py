"""Benchmark raw -> RTDOSE conversion against plain numpy I/O of the same raw file.

    python benchmarks/convert.py [--sizes 200 400] [--repeats 3] [--dir DIR]

For each size N a realistic float64 N^3 raw dose (mostly zeros, one noisy dose
blob) is written to a temporary folder. Then, alternating, each in a fresh
subprocess so one case's memory cannot inflate another's:
  (a) baseline: numpy reads the raw file and writes the same number of bytes;
  (b) raw_to_rtdose(summation="BEAM") of that file.
Times are perf_counter around the work only (no interpreter start or imports);
the reported time is the median of the repeats. Peak RSS is the child's
VmHWM (whole process, imports included), the maximum over the repeats.
Goals: convert time <= 2.0 x baseline, peak RSS <= 2.5 x raw file size.
Exit status 1 if any size misses a goal.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TIME_GOAL = 2.0
RSS_GOAL = 2.5
MB = 1e6


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def write_raw_dose(path: Path, n: int, seed: int = 0) -> None:
    """A dose blob (Gaussian profiles, 2 % noise, zero below 0.1 % of the peak) on an n^3 grid."""
    rng = np.random.default_rng(seed)
    axis = np.arange(n, dtype=float)
    lateral = np.exp(-(((axis - 0.5 * n) / (0.12 * n)) ** 2))
    depth = np.exp(-(((axis - 0.6 * n) / (0.15 * n)) ** 2))
    plane = np.outer(lateral, lateral)  # (y, x)
    with path.open("wb") as f:
        for k in range(n):  # one z-slab at a time: the writer stays small
            slab = 2.0 * depth[k] * plane
            slab *= 1.0 + 0.02 * rng.standard_normal(slab.shape)
            slab[slab < 2e-3] = 0.0
            slab.tofile(f)


def write_plan(path: Path) -> None:
    """The smallest RT Ion Plan raw_to_rtdose accepts (patient, study, frame of reference)."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.8"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "RTPLAN"
    ds.PatientName, ds.PatientID = "Bench^Mark", "BENCH"
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    dcmwrite(path, ds, enforce_file_format=True)


def child(mode: str, raw: Path, out: Path, plan: Path, n: int) -> None:
    """Run one case and print {"seconds", "peak_rss"} as JSON."""
    if mode == "baseline":
        start = time.perf_counter()
        np.fromfile(raw, dtype=np.float64).tofile(out)
        seconds = time.perf_counter() - start
    else:
        from tasks.dose.write import raw_to_rtdose
        from tasks.moqui.grid import PhantomGrid

        grid = PhantomGrid(dims=(n, n, n), spacing=(2.0, 2.0, 2.0), position=(-float(n),) * 3)
        start = time.perf_counter()
        raw_to_rtdose([raw], grid, plan, out, summation="BEAM", beam_number=1)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes()}))


def run_child(mode: str, raw: Path, out: Path, plan: Path, n: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", mode, "--raw", str(raw), "--out", str(out)]
    command += ["--plan", str(plan), "--sizes", str(n)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    out.unlink()
    return json.loads(result.stdout.splitlines()[-1])


def bench(n: int, repeats: int, folder: Path) -> dict[str, float]:
    raw, plan = folder / f"dose_{n}.raw", folder / "plan.dcm"
    write_raw_dose(raw, n)
    write_plan(plan)
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "convert": []}
    for _ in range(repeats):
        for mode, runs_of_mode in runs.items():
            runs_of_mode.append(run_child(mode, raw, folder / f"{mode}.out", plan, n))
    raw_bytes = raw.stat().st_size
    raw.unlink()
    baseline = statistics.median(r["seconds"] for r in runs["baseline"])
    convert = statistics.median(r["seconds"] for r in runs["convert"])
    rss = max(r["peak_rss"] for r in runs["convert"])
    return {
        "n": n,
        "raw_mb": raw_bytes / MB,
        "baseline_s": baseline,
        "convert_s": convert,
        "time_ratio": convert / baseline,
        "rss_mb": rss / MB,
        "rss_ratio": rss / raw_bytes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 400], help="grid sizes N (N^3)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per case (median time)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: system temp)")
    parser.add_argument("--child", choices=["baseline", "convert"], help=argparse.SUPPRESS)
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.raw, args.out, args.plan, args.sizes[0])
        return 0

    header = (
        f"{'size':>5} {'raw MB':>8} {'baseline s':>11} {'convert s':>10} {'time ratio':>11} "
        f"{'peak RSS MB':>12} {'RSS/raw':>8}  result"
    )
    print(f"goals: time ratio <= {TIME_GOAL}, RSS/raw <= {RSS_GOAL}; median of {args.repeats} runs")
    print(header)
    failed = False
    with tempfile.TemporaryDirectory(prefix="mqi-bench-", dir=args.dir) as tmp:
        for n in args.sizes:
            r = bench(n, args.repeats, Path(tmp))
            goals = (("time", r["time_ratio"], TIME_GOAL), ("RSS", r["rss_ratio"], RSS_GOAL))
            misses = [name for name, ratio, goal in goals if ratio > goal]
            failed |= bool(misses)
            verdict = "PASS" if not misses else "FAIL (" + ", ".join(misses) + ")"
            print(
                f"{n:>4}^3 {r['raw_mb']:>8.1f} {r['baseline_s']:>11.3f} {r['convert_s']:>10.3f} "
                f"{r['time_ratio']:>11.2f} {r['rss_mb']:>12.1f} {r['rss_ratio']:>8.2f}  {verdict}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
