"""What beams hold on the Prefect server, as small values: a host's GPUs, or places in Slurm's queue.

Both are pools of slots held under a renewed lease (tasks/gpu/lease.py, tasks/gpu/broker.py):
a GPU is a limit of 1 per GPU; Slurm's queue (slurm.max_queued_jobs) is one limit of that
many places, held by a beam from before sbatch until Slurm has ended its job.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from config.settings import BackendSettings, Settings


@dataclass(frozen=True)
class GpuPool:
    """A GPU host's leasable GPUs: one Prefect global concurrency limit of 1 per GPU."""

    host: str  # names the limits gpu-<host>-<index> and the GPU events' resources
    gpus: tuple[int, ...]
    lease_seconds: float  # a dead holder's GPU is free again about this long after it died
    size: int = 1  # slots per limit: one engine per GPU

    @classmethod
    def of(cls, backend: BackendSettings) -> GpuPool:
        return cls(host=backend.host, gpus=tuple(backend.gpus), lease_seconds=backend.gpu_lease_seconds)

    @property
    def limit_prefix(self) -> str:
        """The start of the names of this host's GPU limits."""
        return f"gpu-{self.host}-"

    def limit_name(self, index: int) -> str:
        """The Prefect global concurrency limit that stands for one GPU (limit 1)."""
        return f"{self.limit_prefix}{index}"

    def limit_names(self) -> list[str]:
        return [self.limit_name(index) for index in self.gpus]

    def resource(self, index: int) -> str:
        """The event resource of one GPU: mqi.gpu.<host>.<index>."""
        return f"mqi.gpu.{self.host}.{index}"

    def event_resource(self, index: int) -> dict[str, str]:
        """The resource of one GPU's lease and release events: its id and its limit's name."""
        return {"prefect.resource.id": self.resource(index), "prefect.resource.name": self.limit_name(index)}


SkipReason = Callable[[int], str | None]  # why a GPU whose lease is free must be passed over, or None


QUEUE_PLACE = 0  # the one "index" of Slurm's queue: a holder record's `gpu` for a place in it


@dataclass(frozen=True)
class SlurmQueue(GpuPool):
    """Places in Slurm's queue for this deployment's jobs: one limit `slurm-queue-<login host>` of `size`.

    `host` is that limit's name; it also names the places' lease events (mqi.gpu.<host>.0),
    apart from every GPU host's.
    """

    @classmethod
    def of_settings(cls, settings: Settings) -> SlurmQueue | None:
        """The capped queue of a Slurm backend (slurm.max_queued_jobs), or None: no cap."""
        cap = settings.slurm.max_queued_jobs
        if settings.backend.kind != "slurm" or cap is None:
            return None
        login = settings.ssh.host if settings.ssh else "local"
        name = "slurm-queue-" + re.sub(r"[^a-z0-9.-]", "-", login.lower())
        return cls(host=name, gpus=(QUEUE_PLACE,), lease_seconds=settings.backend.gpu_lease_seconds, size=cap)

    @property
    def limit_prefix(self) -> str:
        return f"{self.host}-"  # no limit of this pool has it: none is ever disabled as unconfigured

    def limit_name(self, index: int) -> str:
        return self.host


def holder_pool(settings: Settings) -> GpuPool:
    """What a beam's holder record (holder.json) holds: a place in capped Slurm's queue, else a GPU."""
    return SlurmQueue.of_settings(settings) or GpuPool.of(settings.backend)


def slot_pools(settings: Settings) -> list[GpuPool]:
    """Every pool whose limits must exist before beams run: the GPUs, and a capped Slurm queue."""
    queue = SlurmQueue.of_settings(settings)
    return [GpuPool.of(settings.backend), *([queue] if queue else [])]
