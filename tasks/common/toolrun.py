"""Run an external tool with a hard timeout, its output kept in a log file and followed live.

The interpreter and the engine are other people's programs: they can hang,
crash or print their only useful message on the last line. So every run gets
its own process group (a timeout kills the whole tree), stdout and stderr go
to a log file that outlives the run, and new lines are handed to a callback
while the tool runs (progress) and kept for the error message (tail).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common import stopping

TAIL_LINES = 30
KILL_GRACE_SECONDS = 5.0


@dataclass
class ToolRun:
    """What happened when a tool ran."""

    argv: list[str]
    log_path: Path
    returncode: int | None = None
    timed_out: bool = False
    started: float = 0.0
    ended: float = 0.0
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def tail_text(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(list(self.tail)[-lines:])


class LineFollower:
    """Reads complete new lines from a growing log file."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self._partial = b""

    def new_lines(self, final: bool = False) -> list[str]:
        data = self._partial + self._file.read()
        *lines, self._partial = data.split(b"\n")
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]

    def close(self) -> None:
        self._file.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the tool's process group, then SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_tool(
    argv: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    timeout: float,
    poll: float = 0.5,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> ToolRun:
    """Run `argv` in `cwd` until it exits or `timeout` seconds pass (then kill its group)."""
    stopping.check(f"starting {Path(argv[0]).name}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run = ToolRun(argv=list(argv), log_path=log_path)
    with log_path.open("wb") as log:
        run.started = time.time()
        proc = subprocess.Popen(
            run.argv,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
    follower = LineFollower(log_path)
    deadline = time.monotonic() + timeout

    def consume(final: bool = False) -> None:
        for line in follower.new_lines(final):
            run.tail.append(line)
            if on_line is not None:
                on_line(line)

    try:
        while True:
            try:
                run.returncode = proc.wait(timeout=min(poll, max(deadline - time.monotonic(), 0.01)))
                break
            except subprocess.TimeoutExpired:
                consume()
                if time.monotonic() >= deadline:
                    run.timed_out = True
                    _kill_group(proc)
                    run.returncode = proc.returncode
                    break
    finally:
        if proc.returncode is None:  # we are being interrupted: never leave the tool behind
            _kill_group(proc)
        run.ended = time.time()
        consume(final=True)
        follower.close()
    return run
