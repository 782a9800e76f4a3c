"""The GPUs one host lends to beams, as a small value: what the GPU code needs of the settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from config.settings import BackendSettings


@dataclass(frozen=True)
class GpuPool:
    """A GPU host's leasable GPUs: one Prefect global concurrency limit of 1 per GPU."""

    host: str  # names the limits gpu-<host>-<index> and the GPU events' resources
    gpus: tuple[int, ...]
    lease_seconds: float  # a dead holder's GPU is free again about this long after it died

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


SkipReason = Callable[[int], str | None]  # why a GPU whose lease is free must be passed over, or None
