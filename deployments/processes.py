"""Process trees on Linux: find every process below one, and stop them all, and only them.

`mqi up` must stop exactly what it started, and a cancelled case run must not leave a
tool it was running behind. The tools a flow run launches sit in process groups of their
own (so a timeout kills a whole tool), so killing one process or one group is not enough:
the groups of every descendant are signalled, found before any of them is.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

STOP_GRACE_SECONDS = 15


def _processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        yield int(entry.name), int(fields[1]), int(fields[3])


def session_members(leader: int) -> list[int]:
    """Every process in the session `leader` started (start_new_session), even once it is gone.

    A process whose parent died is adopted by init, so it is no longer below the leader;
    it stays in the leader's session unless it made a session of its own (as the detached
    engine jobs do, on purpose: they outlive us and are adopted by the next run).
    """
    return [pid for pid, _, session in _processes() if session == leader and pid != leader]


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in _processes():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_tree(root: int, grace: float = STOP_GRACE_SECONDS, kill_root: bool = False) -> None:
    """SIGTERM the process groups of `root` and of every process below it; SIGKILL what outlives `grace`.

    `root` must lead a process group of its own (a new session, or setpgid), so that
    none of these groups holds a process it did not start. If it leads a session, every
    process left in that session is stopped too, also when `root` itself is gone (SIGKILLed:
    its children were re-parented, but they are still in its session). `kill_root` SIGKILLs `root`
    first: a flow run being cancelled must not report itself Crashed on SIGTERM. The
    caller reaps `root`.
    """
    pids = [root, *descendants(root), *session_members(root)]
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    if kill_root:
        try:
            os.kill(root, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not any(process_alive(pid) for pid in pids):
                return
            time.sleep(0.2)
