"""GPU leasing against a real Prefect server: pinned, never oversubscribed, leak-proof."""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactCollectionFilter,
    ArtifactCollectionFilterKey,
    FlowFilter,
    FlowFilterName,
)
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.states import Crashed, Running

from config import load_settings
from standins.sample_case import write_sample_case
from tasks.backends import JobState
from tasks.backends.adopt import run_job
from tasks.backends.base import Holder
from tasks.backends.local import LocalBackend
from tasks.gpu import broker as broker_module
from tasks.gpu import events as gpu_event_names
from tasks.gpu import lease as lease_module
from tasks.gpu import limits as limits_module
from tasks.gpu import wakeup as gpu_wakeup
from tasks.gpu.broker import gpu_lease
from tasks.gpu.limits import GpuLimitMissing, ensure_gpu_limits, gpu_status
from tasks.gpu.pool import GpuPool
from tasks.gpu.takeover import holder_gone, take_over
from tasks.moqui.tps_file import read_tps
from tests.beams import prepare_beams, run_beam, server_gpus
from tests.conftest import DATABASES, write_config
from tests.local_server import LocalServer, pointed_at
from tests.service_stack import wait_for

pytestmark = pytest.mark.integration

HOLDER = """
import sys
from config import load_settings
from tasks.gpu.broker import gpu_lease
from tasks.gpu.wakeup import release_signal
from tasks.gpu.pool import GpuPool
from tests.service_stack import wait_for
settings = load_settings(sys.argv[1], env={})
to_a_waiter = sys.argv[3:] == ["--to-a-waiter"]
with gpu_lease(GpuPool.of(settings.backend), who={"case_id": "HOLDER", "beam": sys.argv[2]}) as lease:
    signal = release_signal(settings.backend.host)
    if to_a_waiter:  # hears who waits from now on
        wait_for("the GPU events to be followed", lambda: signal.following)
    print(f"holding {lease.index}", flush=True)
    sys.stdin.readline()  # hold the GPU until told to let go (or killed)
    if to_a_waiter:  # let go once a waiting process of this machine is heard of
        wait_for("a waiting process", lambda: signal.nearby_ahead_of(None))
print("released", flush=True)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LocalServer]:
    local = LocalServer(tmp_path_factory.mktemp("prefect-home"))
    local.start()
    yield local
    local.stop()


@pytest.fixture
def use_server(server) -> Iterator[LocalServer]:
    """Point this process's Prefect client at the local server."""
    with pointed_at(server) as local:
        yield local


@pytest.fixture(params=DATABASES)
def either_server(request) -> Iterator[LocalServer]:
    """`use_server`, or the session's server on PostgreSQL."""
    server = request.getfixturevalue("server" if request.param == "sqlite" else "postgres_server")
    with pointed_at(server) as local:
        yield local


def count_increments(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The limit names of every slot increment from now on (the server is still asked)."""
    increments: list[str] = []
    try_acquire = lease_module._try_acquire

    def counted(client, pool: GpuPool, index: int, holder) -> UUID | None:
        increments.append(pool.limit_name(index))
        return try_acquire(client, pool, index, holder)

    monkeypatch.setattr(lease_module, "_try_acquire", counted)
    return increments


def leased(settings, index: int) -> bool:
    with get_client(sync_client=True) as client:
        return (
            client.read_global_concurrency_limit_by_name(
                GpuPool.of(settings.backend).limit_name(index)
            ).active_slots
            > 0
        )


def start_holder(server: LocalServer, config: Path, beam: str, *options: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(config), beam, *options],
        env=server.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc


def let_go(holder: subprocess.Popen[str]) -> None:
    """Tell a holder process to end its lease, and wait until it has."""
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"


def test_three_cases_of_four_beams_share_two_gpus_without_overlap(either_server, tmp_path):
    config = write_config(tmp_path, {"backend": {"host": "share", "gpus": [0, 1]}})
    settings = load_settings(config, env={})
    launch_log = tmp_path / "launches.jsonl"
    env = {
        **either_server.env(),
        "MQI_STANDIN_LAUNCH_LOG": str(launch_log),
        "MQI_STANDIN_ENGINE_DURATION": "1",
    }
    cases = [write_sample_case(settings.scan_dir, f"SHARE{k}", beams=4) for k in range(3)]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", "--config", str(config), "run", str(c)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for c in cases
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs[0][-3000:]

    lines = launch_log.read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["tool"] == "engine"]
    starts = {r["pid"]: r for r in records if r["event"] == "start"}
    ends = {r["pid"]: r for r in records if r["event"] == "end"}
    assert len(starts) == 12 and set(starts) == set(ends)
    per_gpu: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for pid, start in starts.items():
        per_gpu[str(start["gpu"])].append((start["launched"], ends[pid]["time"]))
        assert read_tps(Path(start["input"]))["GPUID"] == str(start["gpu"])  # pinned to the leased GPU
    assert set(per_gpu) <= {"0", "1"}
    for gpu, spans in per_gpu.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, f"two engines on GPU {gpu} at once"
    events = sorted(
        [(s, 1) for spans in per_gpu.values() for s, _ in spans]
        + [(e, -1) for spans in per_gpu.values() for _, e in spans]
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2
    assert not leased(settings, 0) and not leased(settings, 1)


def test_missing_limit_is_an_error_not_an_unlimited_run(use_server, tmp_path):
    settings = load_settings(write_config(tmp_path, {"backend": {"host": "nolimits", "gpus": [0]}}), env={})
    with (
        pytest.raises(GpuLimitMissing, match="gpu-nolimits-0 do not exist"),
        gpu_lease(GpuPool.of(settings.backend)),
    ):
        pass


def test_gpu_in_use_by_others_is_passed_over(use_server, tmp_path):
    settings = load_settings(write_config(tmp_path, {"backend": {"host": "foreign", "gpus": [0, 1]}}), env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    asked = threading.Semaphore(0)

    def skip(index: int) -> str | None:
        if index == 0:
            asked.release()
            return "1 foreign compute process (pid 4242)"
        return None

    got: list[int] = []
    with gpu_lease(GpuPool.of(settings.backend), only=[1]):  # GPU 0 looks free to Prefect, GPU 1 we hold here

        def wait_for_gpu() -> None:
            got.append(gpu_lease(GpuPool.of(settings.backend), skip=skip).__enter__().index)

        waiter = threading.Thread(target=contextvars.copy_context().run, args=(wait_for_gpu,))
        waiter.start()
        for _ in range(3):  # the waiter has looked at GPU 0 three times and passed it over
            assert asked.acquire(timeout=60)
        assert not leased(settings, 0) and got == []
    waiter.join(timeout=60)
    assert got == [1]


def test_killed_holder_gpu_returns_after_its_lease_expires(use_server, tmp_path):
    config = write_config(tmp_path, {"backend": {"host": "killed", "gpus": [0], "gpu_lease_seconds": 60}})
    settings = load_settings(config, env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    first = start_holder(use_server, config, "1")
    assert first.stdout.readline().strip() == "holding 0"
    status = wait_for(
        "the holder in the GPU status",
        lambda: (row := gpu_status(GpuPool.of(settings.backend))[0])["case"] == "HOLDER" and row,
    )
    assert status["state"] == "leased" and status["beam"] == "1" and status["since"]
    first.kill()  # SIGKILL: no release, no more renewals
    first.wait()
    second = start_holder(use_server, config, "2")
    try:
        assert second.stdout.readline().strip() == "holding 0"  # after expiry (60 s) + reclaim
        let_go(second)
    finally:
        second.kill()
    assert not leased(settings, 0)


@pytest.mark.parametrize("page", [limits_module.LEASE_EVENTS_PAGE, 1])
def test_gpu_status_names_every_holder_from_one_page_of_lease_events_or_one_read_each(
    use_server, tmp_path, monkeypatch, page
):
    """One read names the holders of all leased GPUs; a holder whose lease event is not on that
    page (page 1: only the newest event is) is read on its own, so no leased GPU loses its name."""
    monkeypatch.setattr(limits_module, "LEASE_EVENTS_PAGE", page)
    config = write_config(tmp_path, {"backend": {"host": f"names{page}", "gpus": [0, 1, 2]}})
    pool = GpuPool.of(load_settings(config, env={}).backend)
    ensure_gpu_limits(pool)
    holders = [start_holder(use_server, config, beam) for beam in ("1", "2")]
    try:
        held = {
            int(h.stdout.readline().strip().removeprefix("holding ")): beam
            for h, beam in zip(holders, "12", strict=True)
        }
        rows = wait_for(
            "both holders in the GPU status",
            lambda: (
                (rows := gpu_status(pool)) and all(rows[i]["beam"] == b for i, b in held.items()) and rows
            ),
        )
        assert {row["gpu"]: row["state"] for row in rows} == {
            index: "leased" if index in held else "free" for index in range(3)
        }
        assert all(rows[index]["case"] == "HOLDER" and rows[index]["since"] for index in held)
        assert [row["case"] for row in rows if row["gpu"] not in held] == [""]
    finally:
        for holder in holders:
            let_go(holder)
            holder.wait()


def test_server_restart_while_a_gpu_is_held_leaks_no_slot(either_server, tmp_path):
    config = write_config(tmp_path, {"backend": {"host": "restart", "gpus": [0]}})
    settings = load_settings(config, env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    holder = start_holder(either_server, config, "1")
    try:
        assert holder.stdout.readline().strip() == "holding 0"
        either_server.stop()
        either_server.start()
        assert leased(settings, 0)
        let_go(holder)
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    assert not leased(settings, 0)


def test_release_in_another_process_wakes_the_waiter_through_the_event_stream(
    use_server, tmp_path, monkeypatch
):
    monkeypatch.setattr(gpu_wakeup, "POLL_SECONDS", 600)  # only the release event can wake the waiter
    monkeypatch.setattr(gpu_wakeup, "FALLBACK_SECONDS", 600)
    config = write_config(tmp_path, {"backend": {"host": "wakeup", "gpus": [0]}})
    settings = load_settings(config, env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    signal = gpu_wakeup.release_signal("wakeup")
    signal.follow()
    assert wait_for("the release events to be followed", lambda: signal.following)
    waiting = threading.Event()
    wait = signal.wait
    monkeypatch.setattr(signal, "wait", lambda *args: (waiting.set(), wait(*args))[1])
    holder = start_holder(use_server, config, "1")
    got: list[int] = []

    def take() -> None:
        with gpu_lease(GpuPool.of(settings.backend)) as lease:
            got.append(lease.index)

    try:
        assert holder.stdout.readline().strip() == "holding 0"
        waiter = threading.Thread(target=contextvars.copy_context().run, args=(take,))
        waiter.start()
        assert waiting.wait(timeout=60)  # the waiter found GPU 0 taken and waits
        let_go(holder)
        waiter.join(timeout=60)
    finally:
        holder.kill()
    assert got == [0]
    assert not leased(settings, 0)


def test_beam_ending_while_another_of_its_process_waits_hands_its_gpu_over(use_server, tmp_path, monkeypatch):
    settings = load_settings(write_config(tmp_path, {"backend": {"host": "handoff", "gpus": [0]}}), env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    signal = gpu_wakeup.release_signal("handoff")
    waiting = threading.Event()
    wait = signal.wait
    monkeypatch.setattr(signal, "wait", lambda *args: (waiting.set(), wait(*args))[1])
    got: list[tuple[int, bool]] = []

    def second() -> None:
        with gpu_lease(GpuPool.of(settings.backend), who={"case_id": "C", "beam": "2"}) as lease:
            got.append((lease.index, leased(settings, lease.index)))

    with gpu_lease(GpuPool.of(settings.backend), who={"case_id": "C", "beam": "1"}):
        waiter = threading.Thread(target=contextvars.copy_context().run, args=(second,))
        waiter.start()
        assert waiting.wait(timeout=60)  # beam 2 waits for the only GPU
    waiter.join(timeout=60)
    assert got == [(0, True)]
    assert not leased(settings, 0)  # given back to the server once nobody waits

    def leases() -> list[dict]:
        with get_client(sync_client=True) as client:
            page = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=["mqi.gpu.leased"]),
                    resource=EventResourceFilter(id=["mqi.gpu.handoff.0"]),
                ),
                limit=10,
            )
        return [event.payload for event in page.events]

    payloads = wait_for("both lease events", lambda: found if len(found := leases()) == 2 else None)
    assert {p["beam"] for p in payloads} == {"1", "2"}
    assert payloads[0]["lease_id"] == payloads[1]["lease_id"]  # one server lease, handed over


def gpu_events(resource: str) -> list[tuple[str, dict]]:
    """The lease and release events of one GPU, oldest first."""
    with get_client(sync_client=True) as client:
        page = client.read_events(
            filter=EventFilter(
                event=EventNameFilter(name=["mqi.gpu.leased", gpu_event_names.RELEASED]),
                resource=EventResourceFilter(id=[resource]),
            ),
            limit=20,
        )
    return [(event.event, event.payload) for event in reversed(page.events)]


def test_a_process_on_this_machine_that_waits_gets_the_lease_straight_from_the_holder(use_server, tmp_path):
    """No release to the server in between: the slot stays taken, only its holder changes."""
    config = write_config(tmp_path, {"backend": {"host": "direct", "gpus": [0]}})
    settings = load_settings(config, env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    holder = start_holder(use_server, config, "1", "--to-a-waiter")
    got: list[tuple[int, bool]] = []

    def take() -> None:
        with gpu_lease(GpuPool.of(settings.backend), who={"case_id": "C", "beam": "2"}) as lease:
            got.append((lease.index, leased(settings, lease.index)))

    try:
        assert holder.stdout.readline().strip() == "holding 0"
        waiter = in_thread(take)
        wait_for("the beam to queue", lambda: waiting_beams(settings) == 1)
        let_go(holder)
        waiter.join(timeout=60)
    finally:
        holder.kill()
    assert got == [(0, True)]
    assert not leased(settings, 0)  # given back to the server once nobody waits
    events = wait_for(
        "four lease events", lambda: found if len(found := gpu_events("mqi.gpu.direct.0")) == 4 else None
    )
    assert [(name, payload["beam"]) for name, payload in events] == [
        ("mqi.gpu.leased", "1"),
        ("mqi.gpu.released", "1"),
        ("mqi.gpu.leased", "2"),
        ("mqi.gpu.released", "2"),
    ]
    assert events[1][1][gpu_event_names.HANDED_OVER] is True  # woke nobody: the slot was still taken
    assert events[0][1]["lease_id"] == events[2][1]["lease_id"]  # one server lease, two processes
    assert gpu_event_names.HANDED_OVER not in events[3][1]


def test_sync_creates_updates_and_disables(use_server, tmp_path):
    four = GpuPool.of(
        load_settings(
            write_config(tmp_path, {"backend": {"host": "sync", "gpus": [0, 1, 2, 3]}}), env={}
        ).backend
    )
    assert ensure_gpu_limits(four)["created"] == four.limit_names()
    assert ensure_gpu_limits(four)["unchanged"] == four.limit_names()  # idempotent
    two = GpuPool.of(
        load_settings(write_config(tmp_path, {"backend": {"host": "sync", "gpus": [0, 1]}}), env={}).backend
    )
    assert ensure_gpu_limits(two)["disabled"] == ["gpu-sync-2", "gpu-sync-3"]
    with get_client(sync_client=True) as client:
        assert not client.read_global_concurrency_limit_by_name("gpu-sync-3").active
    assert ensure_gpu_limits(four)["updated"] == ["gpu-sync-2", "gpu-sync-3"]
    assert os.environ["PREFECT_API_URL"] == use_server.api_url


def test_gpu_monitor_is_one_run_that_republishes_the_table_at_every_lease_and_release(use_server, tmp_path):
    """The table follows the lease events: each change shows well before the monitor's 60 s refresh."""
    config = write_config(tmp_path, {"backend": {"host": "monitor", "gpus": [0, 1]}})
    ensure_gpu_limits(GpuPool.of(load_settings(config, env={}).backend))
    code = f"from flows.gpu_monitor import gpu_monitor; gpu_monitor({str(config)!r})"
    with (tmp_path / "monitor.log").open("wb") as log:
        monitor = subprocess.Popen(
            [sys.executable, "-c", code], env=use_server.env(), stdout=log, stderr=subprocess.STDOUT
        )
    holder = None
    try:
        wait_for("the first table", lambda: (rows := gpu_table("monitor")) and rows[0]["state"] == "free")
        holder = start_holder(use_server, config, "2 (1G000:TX)")  # another process, as in production
        held = int(holder.stdout.readline().strip().removeprefix("holding "))
        rows = wait_for(
            "the lease in the table",
            lambda: (rows := gpu_table("monitor")) and rows[held]["case"] == "HOLDER" and rows,
            timeout=30,
        )
        assert {row["gpu"]: row["state"] for row in rows} == {held: "leased", 1 - held: "free"}
        assert rows[held]["beam"] == "2 (1G000:TX)" and rows[held]["since"]
        let_go(holder)
        released = lambda: gpu_table("monitor")[held]["state"] == "free"  # noqa: E731
        wait_for("the release in the table", released, timeout=30)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["gpu-monitor"])))
        assert [run.name for run in runs] == ["gpu-monitor"]  # one run, under a fixed name
    finally:
        for process in (holder, monitor):
            if process is not None:
                process.kill()
                process.wait()


def gpu_table(host: str) -> list[dict] | None:
    """The newest version of the GPU table artifact of `host`."""
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[f"gpus-{host}"]))
        )
    if not found:
        return None
    data = found[0].data
    return json.loads(data) if isinstance(data, str) else data


def waiting_beams(settings) -> int:
    """How many beams of this process wait for a GPU of the configured host."""
    broker = broker_module._broker(GpuPool.of(settings.backend))
    with broker._cond:
        return len(broker._waiting)


def in_thread(target) -> threading.Thread:
    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,))
    thread.start()
    return thread


def test_waiting_beams_of_a_process_get_the_gpu_in_arrival_order(use_server, tmp_path):
    settings = load_settings(write_config(tmp_path, {"backend": {"host": "order", "gpus": [0]}}), env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    order: list[str] = []

    def beam(name: str) -> None:
        with gpu_lease(GpuPool.of(settings.backend), who={"case_id": "C", "beam": name}):
            order.append(name)

    with gpu_lease(GpuPool.of(settings.backend), who={"case_id": "C", "beam": "first"}):
        waiters = []
        for k, name in enumerate(["a", "b", "c"], start=1):
            waiters.append(in_thread(lambda name=name: beam(name)))
            wait_for(f"beam {name} to queue", lambda k=k: waiting_beams(settings) == k)
    for waiter in waiters:
        waiter.join(timeout=60)
    assert order == ["a", "b", "c"]
    assert not leased(settings, 0)


def test_a_gpu_is_handed_over_while_the_server_is_slow_to_answer(use_server, tmp_path, monkeypatch):
    """Under load a read of the limits took 1.5 s; the beam that ends must not wait for it, and
    the read, answering once nobody waits, takes no GPU."""
    settings = load_settings(write_config(tmp_path, {"backend": {"host": "slow", "gpus": [0]}}), env={})
    pool = GpuPool.of(settings.backend)
    ensure_gpu_limits(pool)
    slow, in_read, answer = threading.Event(), threading.Event(), threading.Event()
    free_gpus = lease_module._free_gpus
    increments = count_increments(monkeypatch)

    def slow_read(*args) -> list[int]:
        if slow.is_set() and not in_read.is_set():
            in_read.set()
            assert answer.wait(timeout=60)
        return free_gpus(*args)

    monkeypatch.setattr(lease_module, "_free_gpus", slow_read)
    got = threading.Event()

    def second() -> None:
        with gpu_lease(GpuPool.of(settings.backend), who={"case_id": "C", "beam": "2"}):
            got.set()

    with gpu_lease(GpuPool.of(settings.backend), who={"case_id": "C", "beam": "1"}):
        slow.set()
        waiter = in_thread(second)
        assert in_read.wait(timeout=60)  # the server is asked for beam 2 and has not answered
    try:
        assert got.wait(timeout=30), "beam 2 waited for the server although beam 1 handed its GPU over"
        waiter.join(timeout=60)  # beam 2 has given GPU 0 back
    finally:
        answer.set()  # the slow read now finds GPU 0 free, and nobody waiting for it
    wait_for("the slow read to end", lambda: not broker_module._broker(pool)._asking)
    assert increments == ["gpu-slow-0"], increments  # beam 1's only
    assert not leased(settings, 0)


def test_one_read_serves_every_waiting_beam_and_takes_no_more(use_server, tmp_path, monkeypatch):
    config = write_config(tmp_path, {"backend": {"host": "batch", "gpus": [0, 1, 2]}})
    settings = load_settings(config, env={})
    ensure_gpu_limits(GpuPool.of(settings.backend))
    reads: list[int] = []
    increments = count_increments(monkeypatch)
    queued = threading.Event()
    free_gpus = lease_module._free_gpus

    def counted_read(*args) -> list[int]:
        assert queued.wait(timeout=60)  # answer once both beams wait
        reads.append(1)
        return free_gpus(*args)

    monkeypatch.setattr(lease_module, "_free_gpus", counted_read)
    got: list[int] = []
    both_hold = threading.Barrier(3)

    def beam() -> None:
        with gpu_lease(GpuPool.of(settings.backend)) as lease:
            got.append(lease.index)
            both_hold.wait(timeout=60)

    waiters = [in_thread(beam), in_thread(beam)]
    wait_for("both beams to queue", lambda: waiting_beams(settings) == 2)
    queued.set()
    both_hold.wait(timeout=60)
    assert len(set(got)) == 2 and len(reads) == 1
    assert sorted(increments) == sorted(f"gpu-batch-{index}" for index in got)  # no third GPU taken
    for waiter in waiters:
        waiter.join(timeout=60)
    assert not any(leased(settings, index) for index in (0, 1, 2))


def test_a_handed_over_gpu_wakes_no_other_process(use_server):
    """Its slot stays taken: waking every other process to read the limits would only load the server."""
    signal = gpu_wakeup.release_signal("quiet")
    signal.follow()
    assert wait_for("the release events to be followed", lambda: signal.following)
    seen = signal.count()
    resource = {"prefect.resource.id": GpuPool("quiet", (0,), 60).resource(0)}
    emit_event(gpu_event_names.RELEASED, resource=resource, payload={gpu_event_names.HANDED_OVER: True})
    emit_event(gpu_event_names.RELEASED, resource=resource, payload={"case_id": "C"})  # sent after it
    wait_for("the plain release to wake the waiters", lambda: signal.count() > seen)
    assert signal.count() == seen + 1


def test_a_release_is_first_for_the_process_that_has_waited_longest(use_server, monkeypatch):
    """Processes that out-waited this one ask first, unless more GPUs came free than they are."""
    monkeypatch.setattr(gpu_wakeup, "TURN_SECONDS", 0.2)
    signal = gpu_wakeup.release_signal("turns")
    signal.follow()
    assert wait_for("the release events to be followed", lambda: signal.following)
    gpu = {"prefect.resource.id": GpuPool("turns", (0,), 60).resource(0)}
    queue = {"prefect.resource.id": "mqi.gpu.turns.waiting"}

    def other_waits(since: float | None) -> None:
        """Another process says since when its first beam waits (None: no beam waits any more)."""
        emit_event(gpu_event_names.WAITING, resource=queue, payload={"process": "other", "since": since})

    def releases(count: int) -> int:
        """`count` GPUs are released (heard after what was sent before); the count before them."""
        seen = signal.count()
        for _ in range(count):
            emit_event(gpu_event_names.RELEASED, resource=gpu, payload={})
        wait_for("the releases", lambda: signal.count() >= seen + count)
        return seen

    other_waits(100.0)
    seen = releases(1)
    assert signal.wait(seen, since=200.0) is True  # the other has waited longer: its turn, which ran out
    assert signal.wait(seen, since=50.0) is False  # this one has: its turn at once
    assert signal.wait(seen) is False  # an adopted job's wait knows no turns
    seen = releases(2)
    assert signal.wait(seen, since=200.0) is False  # one GPU each
    signal.forget_ahead_of(200.0)  # it let its turn pass with a GPU free: dead or stuck
    seen = releases(1)
    assert signal.wait(seen, since=200.0) is False
    other_waits(100.0)
    seen = releases(1)
    assert signal.wait(seen, since=200.0) is True  # heard of again
    other_waits(None)
    seen = releases(1)
    assert signal.wait(seen, since=200.0) is False


def test_processes_of_this_machine_that_waited_longer_are_offered_a_gpu_first(use_server):
    """Who a beam that ends here offers its GPU to: waiters on this machine, longest first."""
    signal = gpu_wakeup.release_signal("nearby")
    signal.follow()
    assert wait_for("the release events to be followed", lambda: signal.following)
    queue = {"prefect.resource.id": "mqi.gpu.nearby.waiting"}

    def waits(process: str, node: str, since: float | None) -> None:
        payload = {"process": process, "node": node, "since": since}
        emit_event(gpu_event_names.WAITING, resource=queue, payload=payload)

    waits("late", gpu_wakeup.NODE, 300.0)
    waits("early", gpu_wakeup.NODE, 100.0)
    waits("remote", "another-machine", 50.0)  # cannot be handed a lease over a local socket
    wait_for("both local waiters", lambda: signal.nearby_ahead_of(None) == ["early", "late"])
    assert signal.nearby_ahead_of(200.0) == ["early"]  # only those that waited longer than our beam
    waits("early", gpu_wakeup.NODE, None)  # its beams got GPUs
    wait_for("the early process to stop waiting", lambda: signal.nearby_ahead_of(None) == ["late"])
    signal.forget("late")  # its socket refused: gone
    assert signal.nearby_ahead_of(None) == []


@flow(name="gpu-holder")
def holder_flow() -> None:
    """Stands for the case run named in a job's holder record (never run)."""


def holding_gpu_0(server: LocalServer, config: Path, pool: GpuPool) -> tuple[subprocess.Popen[str], str]:
    """A holder process that has taken GPU 0, and its lease id (from its lease event)."""
    holder = start_holder(server, config, "1")
    try:
        assert holder.stdout.readline().strip() == "holding 0"
        [leased_event] = wait_for(
            "the lease event",
            lambda: [e for e in events_of(pool, 0) if e.event == gpu_event_names.LEASED],
            timeout=60,
        )
    except BaseException:
        holder.kill()
        raise
    return holder, leased_event.payload["lease_id"]


def test_a_gone_holders_gpu_is_taken_at_once_and_a_live_one_is_never_robbed(use_server, tmp_path):
    """The holder record of an adopted job names a flow run and its lease: while that run is not
    final nothing is released; once it is Crashed its lease is released at once, not after
    gpu_lease_seconds (600 s here)."""
    config = write_config(tmp_path, {"backend": {"host": "takeover", "gpus": [0], "gpu_lease_seconds": 600}})
    settings = load_settings(config, env={})
    pool = GpuPool.of(settings.backend)
    ensure_gpu_limits(pool)
    holder, lease_id = holding_gpu_0(use_server, config, pool)
    try:
        with get_client(sync_client=True) as client:
            run = client.create_flow_run(holder_flow, name="HOLDER", state=Running())
            assert take_over(pool, 0, lease_id, str(run.id), 1, None, 1) is None  # alive: not robbed
            # the holder's own run, same attempt (a task retry in the same process): not robbed either
            assert take_over(pool, 0, lease_id, str(run.id), 2, str(run.id), 2) is None
            assert leased(settings, 0) and holder.poll() is None

            holder.kill()  # SIGKILL: nobody releases or renews the lease now
            holder.wait()
            client.set_flow_run_state(run.id, Crashed(message="killed"), force=True)
            assert take_over(pool, 0, lease_id, str(run.id), 1, None, 1) == "its run HOLDER ended Crashed"
        assert not leased(settings, 0)  # free now, not when the lease expires
        with gpu_lease(pool, only=[0]) as lease:
            assert lease.index == 0
    finally:
        holder.kill()


def test_an_earlier_attempt_of_the_same_run_is_a_gone_holder(use_server):
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(holder_flow, name="RETRIED", state=Running())
        assert holder_gone(client, str(run.id), 1, str(run.id), 2) == "an earlier attempt (1) of this run"
        assert holder_gone(client, str(run.id), 2, str(run.id), 2) is None
        assert holder_gone(client, str(uuid4()), 1, str(run.id), 1).endswith("no longer exists")


def events_of(pool: GpuPool, index: int) -> list:
    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(resource=EventResourceFilter(id=[pool.resource(index)])), limit=50
        )
    return page.events


def test_a_finished_job_whose_holder_was_killed_frees_its_gpu_when_collected(use_server, tmp_path):
    """A run killed after its engine ended, before it gave its lease back: the run that collects
    the finished job releases that lease at once, not when it expires (600 s here)."""
    config = write_config(tmp_path, {"backend": {"host": "collect", "gpus": [0], "gpu_lease_seconds": 600}})
    settings = load_settings(config, env={})
    pool = GpuPool.of(settings.backend)
    ensure_gpu_limits(pool)
    backend = LocalBackend(settings)
    [beam] = prepare_beams(settings, "COLLECT")
    job = run_beam(backend, beam).job
    assert job.state is JobState.FINISHED_OK
    holder, lease_id = holding_gpu_0(use_server, config, pool)
    holder.kill()  # SIGKILL: the lease stays taken, nobody renews or releases it
    holder.wait()
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(holder_flow, name="KILLED", state=Crashed(message="killed"))
    dead = Holder(run=str(run.id), attempt=1, gpu=0, lease=lease_id, beam=beam.label)
    backend.hold(job, dead)
    assert leased(settings, 0)
    said: list[str] = []

    def let_go(previous: Holder) -> None:
        assert take_over(pool, previous.gpu, previous.lease, previous.run, previous.attempt, None, 1)

    followed = run_job(
        settings, backend, beam, server_gpus(settings), tmp_path / "engine.log", None, said.append, let_go
    )
    assert followed.job.state is JobState.FINISHED_OK and "collecting the job that finished" in said[0]
    assert not leased(settings, 0)  # free now, not in 600 s
