"""nvidia-smi on the GPU host: which GPUs there are, how full and hot, and which processes use them.

Two queries (`--query-gpu`, `--query-compute-apps`), as CSV without header or units. Real output
has "N/A" (or "[N/A]", "[Not Supported]") in any field, process names with
commas, fewer fields from older drivers, "No devices were found" when there
is no GPU, and no nvidia-smi at all where there is no driver: each becomes a
clear result or a GpuQueryError, never a crash. The commands run through the
configured backend, so the same code asks this machine or the HPC node.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from config.settings import BackendSettings, Settings
from tasks.backends import Backend, make_backend
from tasks.backends.base import CommandResult
from tasks.backends.sshconn import SecretLookup

GPU_QUERY = [
    "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,temperature.gpu,utilization.gpu",
    "--format=csv,noheader,nounits",
]
APP_QUERY = ["--query-compute-apps=pid,gpu_uuid,process_name,used_memory", "--format=csv,noheader,nounits"]
NOT_AVAILABLE = {"", "n/a", "[n/a]", "not supported", "[not supported]", "unknown error", "[unknown error]"}
NO_GPUS = "No devices were found"
QUERY_TIMEOUT_SECONDS = 30.0
COMMAND_NOT_FOUND = 127  # the shell's code for a missing command


class GpuQueryError(RuntimeError):
    """nvidia-smi is missing or failed; the message names the host and the command."""


@dataclass(frozen=True)
class GpuProcess:
    pid: int | None
    gpu_uuid: str
    name: str
    used_memory_mib: int | None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_free_mib: int | None
    temperature_c: int | None
    utilization_pct: int | None
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class GpuReport:
    where: str
    gpus: list[GpuInfo]
    problems: list[str] = field(default_factory=list)  # lines that did not parse; a failed process query


def _text(value: str | None) -> str | None:
    if value is None or value.strip().lower() in NOT_AVAILABLE:
        return None
    return value.strip()


def _number(value: str | None) -> int | None:
    text = _text(value)
    try:
        return None if text is None else round(float(text))
    except ValueError:
        return None


def _fields(line: str, count: int, text_at: int) -> list[str | None]:
    """Split a CSV line into `count` fields; extra commas belong to the free-text field `text_at`."""
    parts = line.split(",")
    if len(parts) > count:
        tail = count - text_at - 1
        parts = [*parts[:text_at], ",".join(parts[text_at : len(parts) - tail]), *parts[len(parts) - tail :]]
    fields: list[str | None] = [part.strip() for part in parts]
    return fields + [None] * (count - len(fields))  # an older driver's missing fields


def parse_gpus(text: str) -> tuple[list[GpuInfo], list[str]]:
    """GPUs from the --query-gpu output, and the lines that could not be read."""
    gpus, problems = [], []
    for line in text.splitlines():
        if not line.strip() or NO_GPUS in line:
            continue
        index, uuid, name, total, used, free, temperature, utilization = _fields(line, 8, text_at=2)
        number = _number(index)
        if number is None:
            problems.append(f"GPU line without an index: {line.strip()!r}")
            continue
        gpus.append(
            GpuInfo(
                index=number,
                uuid=_text(uuid) or "",
                name=_text(name) or "",
                memory_total_mib=_number(total),
                memory_used_mib=_number(used),
                memory_free_mib=_number(free),
                temperature_c=_number(temperature),
                utilization_pct=_number(utilization),
            )
        )
    return gpus, problems


def parse_processes(text: str) -> list[GpuProcess]:
    """Compute processes from the --query-compute-apps output (none: an empty list)."""
    found = []
    for line in text.splitlines():
        if not line.strip() or "No running" in line:
            continue
        pid, uuid, name, memory = _fields(line, 4, text_at=2)
        found.append(
            GpuProcess(
                pid=_number(pid),
                gpu_uuid=_text(uuid) or "",
                name=_text(name) or "",
                used_memory_mib=_number(memory),
            )
        )
    return found


Runner = Callable[[list[str]], CommandResult]


def query_gpus(run: Runner, nvidia_smi: list[str], where: str) -> GpuReport:
    """Ask nvidia-smi (through `run`) for the GPUs and their processes."""
    command = shlex.join(nvidia_smi)
    result = run([*nvidia_smi, *GPU_QUERY])
    output = result.stdout.decode("utf-8", "replace")
    if NO_GPUS in output or NO_GPUS in result.stderr.decode("utf-8", "replace"):
        return GpuReport(where, [])
    if result.code == COMMAND_NOT_FOUND:
        raise GpuQueryError(
            f"nvidia-smi not found on {where} (backend.nvidia_smi: {command}): {result.output()}"
        )
    if result.code != 0:
        raise GpuQueryError(f"{command} failed on {where} (exit {result.code}): {result.output()}")
    gpus, problems = parse_gpus(output)
    apps = run([*nvidia_smi, *APP_QUERY])
    if apps.code != 0:
        problems.append(f"process query failed (exit {apps.code}): {apps.output()}")
        return GpuReport(where, gpus, problems)
    processes = parse_processes(apps.stdout.decode("utf-8", "replace"))
    with_processes = [
        replace(gpu, processes=tuple(p for p in processes if p.gpu_uuid == gpu.uuid)) for gpu in gpus
    ]
    return GpuReport(where, with_processes, problems)


def backend_runner(backend: Backend) -> Runner:
    """Run an argv on the backend's machine (quoted: the host's shell sees plain words)."""
    return lambda argv: backend.run(shlex.join(argv), timeout=QUERY_TIMEOUT_SECONDS)


def gpu_report(settings: Settings, secrets: SecretLookup | None = None) -> GpuReport:
    """The GPU host's nvidia-smi view (this machine for the local backend, the node over SSH)."""
    backend = make_backend(settings, secrets)
    return query_gpus(backend_runner(backend), settings.backend.nvidia_smi, backend.where)


class BusyGpus:
    """A gpu_lease `skip`: pass over a GPU that nvidia-smi shows in use by someone else.

    Asked only about GPUs whose lease is free, so any process there is not one
    of our running beams: another user's job, or an engine left over by a
    worker that died. A GPU with less free memory than `min_free_mib` is passed
    over too (a job that hides its processes, or a card too full to run on).
    Without nvidia-smi (no driver, stand-in engine) it says nothing and the
    leases alone decide. One query serves every GPU for `max_age` seconds.
    """

    def __init__(
        self, run: Runner, nvidia_smi: list[str], where: str, min_free_mib: int = 0, max_age: float = 2.0
    ) -> None:
        self._query = lambda: query_gpus(run, nvidia_smi, where)
        self._min_free = min_free_mib
        self._max_age = max_age
        self._at = -max_age
        self._gpus: dict[int, GpuInfo] = {}

    def __call__(self, index: int) -> str | None:
        if time.monotonic() - self._at >= self._max_age:
            try:
                self._gpus = {gpu.index: gpu for gpu in self._query().gpus}
            except (RuntimeError, OSError):  # GpuQueryError, a lost connection, a timeout
                self._gpus = {}
            self._at = time.monotonic()
        gpu = self._gpus.get(index)
        if gpu is None:
            return None
        if gpu.processes:
            listed = ", ".join(f"pid {p.pid} {p.name} ({p.used_memory_mib} MiB)" for p in gpu.processes)
            return f"nvidia-smi shows process(es) not started by this orchestrator: {listed}"
        free = gpu.memory_free_mib
        if free is not None and free < self._min_free:
            return f"only {free} MiB free, below backend.min_free_memory_mib ({self._min_free} MiB)"
        return None


def busy_gpus(settings: BackendSettings, backend: Backend) -> BusyGpus:
    """The skip check for `backend`'s GPU host with the configured nvidia-smi and memory floor."""
    return BusyGpus(
        backend_runner(backend),
        settings.nvidia_smi,
        backend.where,
        min_free_mib=settings.min_free_memory_mib,
    )
