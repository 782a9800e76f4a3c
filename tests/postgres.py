"""A real PostgreSQL 15 for tests: initdb + pg_ctl in a temporary folder, on 127.0.0.1.

initdb and postgres refuse to run as root, so as root they run as the `postgres` user
Debian's package creates (or `nobody`), in a folder that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.local_server import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "mqi"


def _unprivileged() -> tuple[list[str], int | None]:
    """The command prefix that runs PostgreSQL's tools unprivileged, and the uid they run as."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"], (
            account.pw_uid
        )
    raise RuntimeError("running as root and there is no postgres or nobody user to run PostgreSQL as")


class Postgres:
    """One PostgreSQL cluster in its own temporary folder (not under pytest's root-only tmp)."""

    def __init__(self) -> None:
        self.prefix, uid = _unprivileged()
        self.folder = Path(tempfile.mkdtemp(prefix="mqi-pg-"))
        if uid is not None:
            os.chown(self.folder, uid, -1)
        self.data = self.folder / "data"
        self.port = free_port()

    def _run(self, *argv: str, timeout: float = 120) -> None:
        done = subprocess.run([*self.prefix, *argv], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> str:
        """A new database; its SQLAlchemy URL for the Prefect server."""
        self._run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{USER}@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)


def available() -> bool:
    return (PG_BIN / "initdb").exists()
