"""A real single-node Slurm for tests: munged, slurmctld and slurmd started by hand in a folder.

Debian's slurmctld, slurmd, slurm-client and munge packages, run as root with their own
munge key and socket, spool, state, logs and ports, so nothing outside the folder is
touched. The node has 8 CPUs (SlurmdParameters=config_overrides lets it claim more than
the box has: GPUs, not cores, limit how many jobs run) and GPUS fake GPUs, character
devices made with mknod (Slurm rejects plain files, and CUDA_VISIBLE_DEVICES then comes
out empty). Without slurmdbd: job states come from squeue and the jobcomp file (sacct -c).
Ready means sinfo shows the node idle, never "some time has passed".
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.local_server import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
SLURM_PATHS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
# Slurm schedules at once on submission and on a job's end, and backfills every second:
# the defaults (batch_sched_delay=3, bf_interval=30) leave GPUs idle between jobs.
SCHEDULER_PARAMETERS = "batch_sched_delay=0,bf_interval=1,sched_min_interval=0"


def missing() -> list[str]:
    """The daemons and commands a cluster needs that are not installed."""
    wanted = [*SLURM_PATHS.values(), "sbatch", "squeue", "sacct", "scancel", "sinfo"]
    return [name for name in wanted if not (Path(name).exists() or shutil.which(name))]


class SlurmCluster:
    """munged + slurmctld + slurmd on this machine, config in `root`; env() points commands at it."""

    def __init__(self, root: Path, gpus: int = 4) -> None:
        self.root = root
        self.gpus = gpus
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "log" / "jobcomp.txt"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def _write(self) -> None:
        root = self.root
        for folder in ("munge", "state", "spool", "log"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(root / "munge", 0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        for index in range(self.gpus):
            device = root / f"fakegpu{index}"
            if not device.exists():
                subprocess.run(["mknod", str(device), "c", "1", "3"], check=True)  # like /dev/null
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=mqitest",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={root}/munge/socket",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={root}/state",
                    f"SlurmdSpoolDir={root}/spool",
                    f"SlurmctldPidFile={root}/slurmctld.pid",
                    f"SlurmdPidFile={root}/slurmd.pid",
                    f"SlurmctldLogFile={root}/log/slurmctld.log",
                    f"SlurmdLogFile={root}/log/slurmd.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "DefMemPerCPU=100",
                    "SlurmdParameters=config_overrides",
                    "GresTypes=gpu",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/filetxt",
                    f"JobCompLoc={self.jobcomp}",
                    f"SchedulerParameters={SCHEDULER_PARAMETERS}",
                    "MinJobAge=300",
                    "ReturnToService=2",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=20000 Gres=gpu:{self.gpus}",
                    f"PartitionName=gpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        (root / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={self.host} Name=gpu File={root}/fakegpu[0-{self.gpus - 1}]\n"
        )

    def _start(self, name: str) -> None:
        root = self.root
        log = (root / "log" / f"{name}.out").open("ab")
        if name == "munged":
            argv = [
                SLURM_PATHS[name], "--foreground", "--force", f"--socket={root}/munge/socket",
                f"--key-file={root}/munge/munge.key", f"--pid-file={root}/munge/pid",
                f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/seed",
            ]  # fmt: skip
        else:
            argv = [SLURM_PATHS[name], "-D", "-f", str(self.conf)]
        self._procs[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        if name == "munged":
            self._wait("munged's socket", lambda: (root / "munge" / "socket").exists())

    def _stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _wait(self, what: str, check: Callable[[], object], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): see {self.root}/log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up after {timeout} s waiting for {what}: see {self.root}/log")
            time.sleep(0.1)

    def command(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), env={**os.environ, **self.env()}, capture_output=True, text=True, timeout=timeout
        )

    def node_state(self) -> str:
        try:
            return self.command("sinfo", "-h", "-N", "-o", "%T", timeout=5).stdout.strip()
        except subprocess.TimeoutExpired:
            return ""

    def start(self) -> None:
        self._write()
        for name in DAEMONS:
            self._start(name)
        self._wait("the node to be idle", lambda: self.node_state() in ("idle", "mixed", "allocated"))

    def stop_controller(self) -> None:
        self._stop("slurmctld")

    def start_controller(self) -> None:
        self._start("slurmctld")
        self._wait("slurmctld to answer", lambda: bool(self.node_state()))

    def stop(self) -> None:
        if "slurmctld" in self._procs:
            self.command("scancel", "--user=root", timeout=10)
        for name in reversed(DAEMONS):
            self._stop(name)

    def jobs(self) -> list[dict[str, str]]:
        """Every job Slurm knows (squeue, final ones too): id, name, state."""
        out = self.command("squeue", "-h", "-t", "all", "-o", "%i|%j|%T").stdout
        return [dict(zip(("id", "name", "state"), line.split("|"), strict=True)) for line in out.splitlines()]
