"""A real OpenSSH sshd on 127.0.0.1 for tests, and a fake HPC node behind it.

The server runs as the current user (root or not) from Debian's
openssh-server, with its own host key, one client key in its own
authorized_keys file, and a known_hosts file that trusts its host key. It is
started and stopped by tests (the reconnect test stops it mid-job); ready
means it answers with an SSH banner, never "some time has passed".
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tests.local_server import free_port

SSHD = Path("/usr/sbin/sshd")
FIXTURES = Path(__file__).parent / "fixtures"
NO_PROCESSES_GPUS = (
    "0, GPU-0a1b2c3d-0000-0000-0000-000000000000, NVIDIA A100-SXM4-40GB, 40960, 4, 40536, 31, 0\n"
    "1, GPU-0a1b2c3d-1111-1111-1111-111111111111, NVIDIA A100-SXM4-40GB, 40960, 4, 40536, 33, 0\n"
)


def keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "mqi-test", "-f", str(path)], check=True
    )
    return path


def _sshd_processes(pid: int) -> list[int]:
    """sshd's per-connection processes below `pid`, from /proc.

    Only sshd itself: the shells it started are left to end on their own, as
    when a real sshd dies (killing a login shell mid-way can leave its rc
    files' locks behind, e.g. pyenv's rehash lock, which stalls every later login).
    """
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                name, rest = stat.split("(", 1)[1].rsplit(")", 1)
                parents[int(entry.name)] = (int(rest.split()[1]), name)
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [child for child, (ppid, name) in parents.items() if ppid == parent and name == "sshd"]
        found += kids
        todo += kids
    return found


class Sshd:
    """sshd -D -e on 127.0.0.1:<free port>; `stop()` also ends its open connections."""

    def __init__(self, root: Path, env: Mapping[str, str] | None = None) -> None:
        """`env`: set in every session (sshd_config SetEnv), e.g. SLURM_CONF for a test cluster."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(root / "ssh_host_ed25519_key")
        self.client_key = keygen(root / "id_ed25519")
        (root / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
        self.port = free_port()
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_key_line()}\n")
        self.config = root / "sshd_config"
        self.config.write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {self.host_key}\n"
            f"PidFile {root / 'sshd.pid'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nMaxStartups 100\n"
            "Subsystem sftp internal-sftp\n"
            + "".join(f"SetEnv {name}={value}\n" for name, value in (env or {}).items())
        )
        self.log = root / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def host_key_line(self) -> str:
        """'<type> <base64>' of the host key, as known_hosts holds it."""
        return " ".join((self.root / "ssh_host_ed25519_key.pub").read_text().split()[:2])

    def start(self, timeout: float = 30.0) -> None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder, needed as root
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0"):
                        return
            except OSError:
                time.sleep(0.02)  # not listening yet: try again
        raise RuntimeError(
            f"sshd did not answer on port {self.port} within {timeout} s: {self.log.read_text()}"
        )

    def stop(self) -> None:
        """Stop the listener and kill every connection it serves (the jobs it started live on)."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *_sshd_processes(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        self.proc.wait(timeout=30)
        self.proc = None


class Hpc:
    """A fake GPU node: an engine folder running the stand-in engine, a fake nvidia-smi, a job root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.engine_dir = root / "moqui"
        self.remote_root = root / "scratch" / "mqi"
        self.bin = root / "bin"
        for folder in (self.engine_dir, self.remote_root, self.bin / "nvidia-smi-data"):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / "nvidia-smi", self.bin / "nvidia-smi")
        self.set_nvidia_smi(NO_PROCESSES_GPUS, "")

    def set_nvidia_smi(self, gpus: str, apps: str, exit_code: int | None = None) -> None:
        data = self.bin / "nvidia-smi-data"
        (data / "gpus.csv").write_text(gpus)
        (data / "apps.csv").write_text(apps)
        (data / "exit_code").unlink(missing_ok=True)
        if exit_code is not None:
            (data / "exit_code").write_text(str(exit_code))

    def ssh_settings(self, sshd: Sshd, **overrides: object) -> dict[str, object]:
        """The ssh: section of a config that runs the stand-in engine on this node."""
        return {
            "host": "127.0.0.1",
            "port": sshd.port,
            "user": getpass.getuser(),
            "key_file": str(sshd.client_key),
            "allow_agent": False,
            "known_hosts": str(sshd.known_hosts),
            "remote_root": str(self.remote_root),
            "engine_dir": str(self.engine_dir),
            "engine_command": [sys.executable, "-m", "standins.tps_env", "{input}"],
            "forward_env": [
                "MQI_STANDIN_LAUNCH_LOG",
                "MQI_STANDIN_ENGINE_DURATION",
                "MQI_STANDIN_ENGINE_FAULT",
            ],
            "poll_seconds": 0.5,
            "connect_timeout_seconds": 10,
            "command_timeout_seconds": 30,
            "reconnect_seconds": 120,
            **overrides,
        }

    def backend_settings(self) -> dict[str, object]:
        return {
            "kind": "ssh",
            "host": "hpc",
            "gpus": [0, 1],
            "nvidia_smi": ["sh", str(self.bin / "nvidia-smi")],
        }
