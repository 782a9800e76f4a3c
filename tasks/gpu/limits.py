"""The GPU limits on the Prefect server: one global concurrency limit of 1 per GPU, and who holds each.

A limit only counts, it does not name a GPU; with one limit per GPU
(`gpu-<host>-<index>`) holding a slot *is* owning that GPU. Limits are created
(idempotently) before any beam asks for one, and a GPU that is no longer configured has
its limit disabled, so the Concurrency page shows it out of service. Who holds a GPU
comes from the newest lease or release event of its resource.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.gpu.events import LEASED, RELEASED
from tasks.gpu.pool import GpuPool
from tasks.prefect_api.client import api_client


class GpuLimitMissing(RuntimeError):
    """A configured GPU has no concurrency limit: refuse rather than run unlimited."""


def ensure_gpu_limits(pool: GpuPool) -> dict[str, list[str]]:
    """Create or update (idempotently) one active limit of 1 per configured GPU.

    Limits of this host's GPUs that are no longer configured are disabled, so
    the Concurrency page shows they are out of service instead of leaving them
    looking usable.
    """
    wanted = set(pool.limit_names())
    done: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": [], "disabled": []}
    with api_client() as client:
        existing = {limit.name: limit for limit in client.read_global_concurrency_limits(limit=200)}
        for name in sorted(wanted):
            limit = existing.get(name)
            if limit is None:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                    )
                    done["created"].append(name)
                except ObjectAlreadyExists:  # another case run created it just now: same limit
                    done["unchanged"].append(name)
            elif limit.limit != 1 or not limit.active:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=1, active=True)
                )
                done["updated"].append(name)
            else:
                done["unchanged"].append(name)
        for name, limit in sorted(existing.items()):
            if name.startswith(pool.limit_prefix) and name not in wanted and limit.active:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active=False))
                done["disabled"].append(name)
    return done


def _last_lease_event(client: SyncPrefectClient, resource_id: str) -> dict[str, object] | None:
    """The newest lease/release event of one GPU in the last day: who holds it, since when."""
    page = client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=datetime.now(UTC) - timedelta(days=1)),
            event=EventNameFilter(name=[LEASED, RELEASED]),
            resource=EventResourceFilter(id=[resource_id]),
        ),
        limit=1,
    )
    if not page.events:
        return None
    event = page.events[0]  # newest first
    return {"event": event.event, "since": event.occurred, **event.payload}


def gpu_status(pool: GpuPool) -> list[dict[str, object]]:
    """One row per configured GPU: limit state from the server, holder from the lease events."""
    rows: list[dict[str, object]] = []
    with api_client() as client:
        for index in pool.gpus:
            name = pool.limit_name(index)
            row: dict[str, object] = {
                "gpu": index,
                "limit": name,
                "state": "missing limit",
                "case": "",
                "beam": "",
                "since": "",
            }
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                rows.append(row)
                continue
            row["state"] = "disabled" if not limit.active else "leased" if limit.active_slots else "free"
            last = _last_lease_event(client, pool.resource(index))
            if row["state"] == "leased" and last and last["event"] == LEASED:
                row.update(
                    case=last.get("case_id", ""),
                    beam=last.get("beam", ""),
                    since=last["since"].isoformat(timespec="seconds"),
                )  # type: ignore[union-attr]
            rows.append(row)
    return rows
