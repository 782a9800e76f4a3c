"""Benchmark the SSH backend's dose download against OpenSSH's sftp and scp, on a loopback sshd.

    python benchmarks/transfer.py [--n 406] [--repeats 3] [--dir DIR]

A realistic raw dose (float64 n^3, mostly zeros with one noisy dose blob; n=406
is 535 MB) is served by a real OpenSSH sshd on 127.0.0.1 (the test suite's
tests/sshd.py: own host key, own client key). Then, alternating, R times each:
  (a) OpenSSH `sftp` downloads it;         (b) OpenSSH `scp` downloads it;
  (c) the project (SshBackend.download: one shared paramiko connection, the file
      streamed through an exec channel, sha256 computed while writing);
  (d) the same with `compression: zstd` (zstd -1 on the host, inflated here).
Each download goes to a fresh local file; time is wall-clock around the download
only (the project's connection is opened once beforehand, as in production).
Reported: the median MB/s (10^6 bytes of raw dose per second) and the ratio to
OpenSSH. Goal: (c) >= 0.8 x sftp. Exit status 1 if the goal is missed.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/sshd.py: the loopback sshd

from convert import write_raw_dose  # benchmarks/convert.py, beside this file

from config.settings import Settings
from tasks.backends.ssh import SshBackend
from tests.sshd import Sshd

GOAL = 0.8
MB = 1e6


def openssh_args(sshd: Sshd, port_flag: str) -> list[str]:
    return [
        port_flag,
        str(sshd.port),
        "-i",
        str(sshd.client_key),
        "-o",
        f"UserKnownHostsFile={sshd.known_hosts}",
        "-o",
        "BatchMode=yes",
        "-q",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=406, help="grid size n (n^3 float64 voxels; 406: 535 MB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        dose = root / "remote" / "dose.raw"
        dose.parent.mkdir()
        write_raw_dose(dose, args.n)
        size = dose.stat().st_size
        expected = hashlib.sha256(dose.read_bytes()).hexdigest()
        sshd = Sshd(root / "sshd")
        sshd.start()
        user = getpass.getuser()
        remote = f"{user}@127.0.0.1:{dose}"
        ssh = {
            "host": "127.0.0.1",
            "port": sshd.port,
            "user": user,
            "key_file": str(sshd.client_key),
            "allow_agent": False,
            "known_hosts": str(sshd.known_hosts),
            "remote_root": str(root / "jobs"),
            "engine_dir": str(root),
            "engine_command": ["tps_env", "{input}"],
        }
        settings = Settings.model_validate({"backend": {"kind": "ssh"}, "ssh": ssh})
        backend = SshBackend(settings)
        backend.run("true")  # connect once, as the orchestrator's long-lived connection is
        out = root / "local.raw"

        def project(compressed: bool) -> Callable[[], None]:
            def run() -> None:
                got = backend.download(str(dose), out, compressed)
                assert got == (expected, size), got  # verified, as fetch() verifies

            return run

        methods: dict[str, Callable[[], None]] = {
            "OpenSSH sftp": lambda: subprocess.run(
                ["sftp", *openssh_args(sshd, "-P"), remote, str(out)], check=True, stdout=subprocess.DEVNULL
            ),
            "OpenSSH scp": lambda: subprocess.run(
                ["scp", *openssh_args(sshd, "-P"), remote, str(out)], check=True
            ),
            "project (no compression)": project(False),
            "project (zstd on the host)": project(True),
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        try:
            for _ in range(args.repeats):
                for name, method in methods.items():
                    out.unlink(missing_ok=True)
                    started = time.perf_counter()
                    method()
                    times[name].append(time.perf_counter() - started)
                    if out.stat().st_size != size:
                        raise SystemExit(f"{name}: downloaded {out.stat().st_size} bytes, expected {size}")
        finally:
            backend.host.close()
            sshd.stop()

    rate = {name: size / statistics.median(t) / MB for name, t in times.items()}
    sftp = rate["OpenSSH sftp"]
    print(f"raw dose {size / MB:.0f} MB (n={args.n}), loopback sshd, median of {args.repeats}")
    for name, value in rate.items():
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:28s} {value:7.0f} MB/s  ({value / sftp:.2f} x sftp; runs {runs} s)")
    ratio = rate["project (no compression)"] / sftp
    ok = ratio >= GOAL
    verdict = "met" if ok else "MISSED"
    print(f"project without compression / OpenSSH sftp = {ratio:.2f} (goal >= {GOAL}): {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
