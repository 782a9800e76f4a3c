"""Fault injection and launch records for the stand-in tools, driven by environment variables.

Tests and benchmarks tell a stand-in tool how to misbehave without changing
its command line (the command line must stay exactly the real tool's):

  MQI_STANDIN_<TOOL>_FAULT       error | segfault | hang   (TOOL = ENGINE or INTERPRETER)
  MQI_STANDIN_<TOOL>_FAULT_KEYS  comma list of keys the fault applies to
                                 (engine: beam numbers; interpreter: case ids); empty = all
  MQI_STANDIN_<TOOL>_FAIL_FIRST  K: the first K launches for a key fail with the tool's error
                                 (engine: a CUDA error, exit 255; interpreter: `Error:`, exit 1),
                                 later ones succeed (needs MQI_STANDIN_LAUNCH_LOG)
  MQI_STANDIN_<TOOL>_DURATION    seconds: take exactly this long (benchmarks)
  MQI_STANDIN_<TOOL>_HOLD        path: a launch (for the fault keys) stays running while this
                                 file exists, so that a test decides when it ends
  MQI_STANDIN_LAUNCH_LOG         path of a JSON-lines file; every launch appends a
                                 "start" and an "end" record
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

FAULTS = ("error", "segfault", "hang")


@dataclass(frozen=True)
class Faults:
    tool: str
    fault: str | None
    keys: frozenset[str]
    fail_first: int
    duration: float | None
    launch_log: Path | None
    hold: Path | None = None

    @classmethod
    def from_env(cls, tool: str) -> Faults:
        prefix = f"MQI_STANDIN_{tool.upper()}_"
        fault = os.environ.get(prefix + "FAULT") or None
        if fault is not None and fault not in FAULTS:
            raise SystemExit(f"{prefix}FAULT must be one of {', '.join(FAULTS)}, not {fault!r}")
        keys = frozenset(k.strip() for k in os.environ.get(prefix + "FAULT_KEYS", "").split(",") if k.strip())
        duration = os.environ.get(prefix + "DURATION")
        log = os.environ.get("MQI_STANDIN_LAUNCH_LOG")
        hold = os.environ.get(prefix + "HOLD")
        return cls(
            tool=tool.lower(),
            fault=fault,
            keys=keys,
            fail_first=int(os.environ.get(prefix + "FAIL_FIRST", "0") or 0),
            duration=float(duration) if duration else None,
            launch_log=Path(log) if log else None,
            hold=Path(hold) if hold else None,
        )

    def applies_to(self, key: str) -> bool:
        return not self.keys or key in self.keys

    def wait_while_held(self, key: str) -> None:
        """Stay here while the hold file exists (for `key`): the test removes it to let go."""
        while self.hold is not None and self.applies_to(key) and self.hold.exists():
            time.sleep(0.05)

    def previous_launches(self, key: str) -> int:
        """How many launches of this tool for `key` the launch log already holds."""
        if self.launch_log is None or not self.launch_log.exists():
            return 0
        wanted = {"event": "start", "tool": self.tool, "key": key}
        records = (json.loads(line) for line in self.launch_log.read_text(encoding="utf-8").splitlines())
        return sum(all(record.get(k) == v for k, v in wanted.items()) for record in records)

    def record(self, event: str, key: str, **fields: object) -> None:
        """Append one JSON line to the launch log (one write call, so concurrent appends stay whole)."""
        if self.launch_log is None:
            return
        entry = {
            "event": event,
            "tool": self.tool,
            "key": key,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
            **fields,
        }
        self.launch_log.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.launch_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def injected_fault(self, key: str, attempt: int) -> str | None:
        """The fault this launch (1-based `attempt` for `key`) must show, if any."""
        if self.fail_first and attempt <= self.fail_first and self.applies_to(key):
            return "error"
        if self.fault and self.applies_to(key):
            return self.fault
        return None


def act_out(fault: str, message: str, error_line: str, error_exit: int, stream: TextIO | None = None) -> None:
    """Misbehave the way the real tool does: its error line and exit code, a segfault, or a hang.

    `error_line` is a format with one `{}` for the message (the engine's CUDA error, the
    interpreter's `Error: ...`), written to `stream` (default stdout).
    """
    sys.stdout.flush()
    if fault == "error":
        print(error_line.format(message), file=stream or sys.stdout, flush=True)
        raise SystemExit(error_exit)
    if fault == "segfault":
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
    if fault == "hang":
        while True:  # until the orchestrator's timeout kills us
            time.sleep(3600)
