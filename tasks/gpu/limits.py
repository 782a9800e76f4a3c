"""The GPU limits on the Prefect server: one global concurrency limit of 1 per GPU, and who holds each.

(A capped Slurm queue is one more limit, of slurm.max_queued_jobs: tasks/gpu/pool.py SlurmQueue.)

A limit only counts, it does not name a GPU; with one limit per GPU
(`gpu-<host>-<index>`) holding a slot *is* owning that GPU. Limits are created
(idempotently) before any beam asks for one, and a GPU that is no longer configured has
its limit disabled, so the Concurrency page shows it out of service. Who holds a GPU
comes from the newest lease or release event of its resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.events import Event
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from config.settings import Settings
from tasks.gpu.events import LEASED, RELEASED
from tasks.gpu.pool import GpuPool, slot_pools
from tasks.prefect_api.client import api_client


class GpuLimitMissing(RuntimeError):
    """A configured GPU has no concurrency limit: refuse rather than run unlimited."""


def ensure_slot_limits(settings: Settings) -> dict[str, list[str]]:
    """ensure_gpu_limits for every pool beams hold slots of: the GPUs, and a capped Slurm queue."""
    done: dict[str, list[str]] = {}
    for pool in slot_pools(settings):
        for what, names in ensure_gpu_limits(pool).items():
            done.setdefault(what, []).extend(names)
    return done


def ensure_gpu_limits(pool: GpuPool) -> dict[str, list[str]]:
    """Create or update (idempotently) one active limit of `pool.size` (1 per GPU) per configured GPU.

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
                        GlobalConcurrencyLimitCreate(name=name, limit=pool.size, active=True)
                    )
                    done["created"].append(name)
                except ObjectAlreadyExists:  # another case run created it just now: same limit
                    done["unchanged"].append(name)
            elif limit.limit != pool.size or not limit.active:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=pool.size, active=True)
                )
                done["updated"].append(name)
            else:
                done["unchanged"].append(name)
        for name, limit in sorted(existing.items()):
            if name.startswith(pool.limit_prefix) and name not in wanted and limit.active:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active=False))
                done["disabled"].append(name)
    return done


LEASE_EVENTS_PAGE = 50  # lease events read at once for the holders of the leased GPUs


def _lease_events(
    client: SyncPrefectClient, resource_ids: list[str], limit: int
) -> dict[str, dict[str, object]]:
    """Resource id -> its newest lease/release event of the last day, among the newest `limit` of them."""
    page = client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=datetime.now(UTC) - timedelta(days=1)),
            event=EventNameFilter(name=[LEASED, RELEASED]),
            resource=EventResourceFilter(id=resource_ids),
        ),
        limit=limit,
    )
    newest: dict[str, dict[str, object]] = {}
    for event in page.events:  # newest first
        newest.setdefault(event.resource.id, lease_event(event))
    return newest


def _holders(client: SyncPrefectClient, pool: GpuPool, leased: list[int]) -> dict[int, dict[str, object]]:
    """GPU -> its newest lease event: one read for all of them; a GPU whose newest event is not
    on that page (it has held its lease while the others changed hands many times) on its own."""
    if not leased:
        return {}
    found = _lease_events(client, [pool.resource(index) for index in leased], LEASE_EVENTS_PAGE)
    for index in leased:
        if pool.resource(index) not in found:
            found.update(_lease_events(client, [pool.resource(index)], 1))
    return {index: found[pool.resource(index)] for index in leased if pool.resource(index) in found}


def lease_event(event: Event) -> dict[str, object]:
    """What a lease or release event says: which, since when, and its payload (case_id, beam, ...)."""
    return {"event": event.event, "since": event.occurred, **event.payload}


def _state(limit: GlobalConcurrencyLimitResponse | None) -> str:
    if limit is None:
        return "missing limit"
    return "disabled" if not limit.active else "leased" if limit.active_slots else "free"


def gpu_status(
    pool: GpuPool, heard: Mapping[int, dict[str, object]] | None = None
) -> list[dict[str, object]]:
    """One row per configured GPU: limit state from the server, holder from the lease events.

    Two reads however many GPUs: every limit at once, then the lease events of the leased
    GPUs whose holder is not in `heard` (a free GPU has no holder to name). `heard`: the
    newest lease event of some GPUs, as a follower of the event stream heard it (the
    server stores events about a second later than it streams them).
    """
    with api_client() as client:
        limits = {limit.name: limit for limit in client.read_global_concurrency_limits(limit=200)}
        states = {index: _state(limits.get(pool.limit_name(index))) for index in pool.gpus}
        known = dict(heard or {})
        unknown = [index for index in pool.gpus if states[index] == "leased" and index not in known]
        known.update(_holders(client, pool, unknown))
    rows: list[dict[str, object]] = []
    for index in pool.gpus:
        row: dict[str, object] = {
            "gpu": index,
            "limit": pool.limit_name(index),
            "state": states[index],
            "case": "",
            "beam": "",
            "beam_number": "",
            "since": "",
        }
        last = known.get(index)
        if row["state"] == "leased" and last and last["event"] == LEASED:
            row.update(
                case=last.get("case_id", ""),
                beam=last.get("beam", ""),
                beam_number=last.get("beam_number", ""),
                since=last["since"].isoformat(timespec="seconds"),
            )  # type: ignore[union-attr]
        rows.append(row)
    return rows


def leased_text(rows: list[dict[str, object]]) -> str:
    """`3/3 leased: P2 beams 2, 4, 5`: how many GPUs are leased, and to which cases' beams."""
    leased = [row for row in rows if row["state"] == "leased"]
    beams: dict[str, list[str]] = {}
    for row in leased:
        beams.setdefault(str(row["case"] or "?"), []).append(str(row["beam_number"] or "?"))
    holders = "; ".join(
        f"{case} beam{'s' if len(numbers) > 1 else ''} {', '.join(sorted(numbers, key=_number))}"
        for case, numbers in beams.items()
    )
    return f"{len(leased)}/{len(rows)} leased" + (f": {holders}" if holders else "")


def _number(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (1 << 30, text)


def places_taken(pool: GpuPool) -> tuple[int, int]:
    """(held, size) of the pool's one limit (a capped Slurm queue); GpuLimitMissing if it is not there."""
    name = pool.limit_name(pool.gpus[0])
    with api_client() as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            missing = f"limit {name} does not exist on the Prefect server; run `mqi gpus sync`"
            raise GpuLimitMissing(missing) from None
    return limit.active_slots, limit.limit


def places_text(pool: GpuPool) -> str:
    """`2/2 taken`: how many of the pool's one limit's slots are held (a capped Slurm queue)."""
    held, size = places_taken(pool)
    return f"{held}/{size} taken"
