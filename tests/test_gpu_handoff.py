"""The local hand-off protocol of GPU leases: offer, accept or decline, commit (no server needed)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from uuid import UUID, uuid4

import pytest

from tasks.gpu import handoff as gpu_handoff
from tasks.gpu.handoff import HandoffPoint, Offer, offer


class Receiver:
    """A process's hand-off point, recording what it was handed (and what the test adds)."""

    def __init__(self, accept: Callable[[], bool] = lambda: True, host: str = "h") -> None:
        self.process = uuid4().hex
        self.log: list[object] = []
        self.received = threading.Semaphore(0)
        self.point = HandoffPoint(self.process, host, accept, self._receive)

    @property
    def got(self) -> list[object]:
        return [entry for entry in self.log if isinstance(entry, tuple)]

    def _receive(self, lease_id: UUID, index: int) -> None:
        self.log.append((lease_id, index))
        self.received.release()


def test_an_accepted_offer_ends_the_givers_hold_before_the_receiver_takes_it():
    receiver, lease_id = Receiver(), uuid4()
    assert (
        offer(receiver.process, "h", 3, lease_id, lambda: receiver.log.append("hold ended")) is Offer.HANDED
    )
    assert receiver.received.acquire(timeout=30)
    assert receiver.log == ["hold ended", (lease_id, 3)]


def test_a_process_with_no_waiting_beam_or_another_host_declines():
    idle, ended = Receiver(accept=lambda: False), []
    assert offer(idle.process, "h", 0, uuid4(), lambda: ended.append(1)) is Offer.DECLINED
    other_host = Receiver(host="other")
    assert offer(other_host.process, "h", 0, uuid4(), lambda: ended.append(1)) is Offer.DECLINED
    assert ended == [] and idle.got == [] and other_host.got == []


def test_an_offer_to_a_process_that_is_gone_says_so():
    assert offer(uuid4().hex, "h", 0, uuid4(), lambda: pytest.fail("nobody accepted")) is Offer.GONE


def test_a_receiver_that_does_not_answer_keeps_nothing_from_the_giver(monkeypatch):
    monkeypatch.setattr(gpu_handoff, "REPLY_SECONDS", 0.2)
    process = uuid4().hex
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind(gpu_handoff._address(process))
        stuck.listen(1)  # connections queue, nobody answers
        assert offer(process, "h", 0, uuid4(), lambda: pytest.fail("nobody accepted")) is Offer.DECLINED


def test_a_giver_that_goes_away_after_the_accept_hands_nothing_over():
    receiver = Receiver()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as giver:
        giver.connect(gpu_handoff._address(receiver.process))
        gpu_handoff._send(giver, {"offer": str(uuid4()), "host": "h", "gpu": 0})
        assert gpu_handoff._read(giver.makefile("rb")) == {"answer": "accept"}
    # no commit; a full offer after it is served only once the first connection is over
    second = uuid4()
    assert offer(receiver.process, "h", 1, second, lambda: None) is Offer.HANDED
    assert receiver.received.acquire(timeout=30)
    assert receiver.got == [(second, 1)]


def test_nonsense_from_a_peer_does_not_stop_the_listener():
    receiver = Receiver()
    for nonsense in (b"[]\n", b'{"gpu": 0}\n', b'{"offer": "not-a-uuid", "gpu": 0}\n', b"\xff\n"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.settimeout(10)
            peer.connect(gpu_handoff._address(receiver.process))
            peer.sendall(nonsense)
            assert peer.recv(100) == b""  # closed without an answer
    assert offer(receiver.process, "h", 1, uuid4(), lambda: None) is Offer.HANDED
    assert receiver.received.acquire(timeout=30)


def test_a_commit_the_receiver_cannot_read_leaves_the_lease_to_the_giver_to_release():
    process, closed = uuid4().hex, threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as receiver:
        receiver.bind(gpu_handoff._address(process))
        receiver.listen(1)

        def accept_then_vanish() -> None:
            conn, _ = receiver.accept()
            with conn:
                gpu_handoff._read(conn.makefile("rb"))
                gpu_handoff._send(conn, {"answer": "accept"})
            closed.set()

        thread = threading.Thread(target=accept_then_vanish)
        thread.start()
        assert offer(process, "h", 0, uuid4(), lambda: closed.wait(timeout=30)) is Offer.BROKEN
        thread.join(timeout=30)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to offer as another user")
def test_an_offer_from_another_user_is_refused():
    receiver = Receiver()
    child = os.fork()
    if child == 0:  # the giver: another user on this machine
        try:
            os.setuid(65534)
            outcome = offer(receiver.process, "h", 0, uuid4(), lambda: None)
            os._exit(0 if outcome is Offer.DECLINED else 1)
        finally:
            os._exit(2)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    assert offer(receiver.process, "h", 2, uuid4(), lambda: None) is Offer.HANDED  # served after it
    assert receiver.received.acquire(timeout=30)
    assert [index for _, index in receiver.got] == [2]
