"""Hand a held GPU lease straight to a waiting process on the same machine.

Between processes a GPU otherwise changes hands through the server: a release
(a write), its event, then the waiting process's read and slot increment (a
write that a busy SQLite server often refuses at first). Measured with 10
cases x 4 beams on 4 GPUs, that took 1.3 s median and up to 3.6 s per hand-off,
while a hand-off inside one process took 0.14 s. So a process whose beam
ends offers its lease to a process on this machine that has waited longer,
over a local socket, and the server's slot stays taken throughout: still
one engine per GPU, and a lease nobody renews still expires. Only who
renews it changes:

    giver:    OFFER {host, gpu, lease}
    receiver: ACCEPT (a beam waits for a GPU of that host) or DECLINE
    giver:    stops renewing, announces its release as handed over, COMMIT
    receiver: renews the lease and gives it to its first waiting beam

If either side dies or stalls half-way, the lease is at worst renewed by
nobody and expires; it is never held by two. The sockets are Linux abstract
sockets named after the process's token: nothing is left on disk, only this
machine can connect, and a peer running as another user is refused.
"""

from __future__ import annotations

import contextvars
import enum
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import BinaryIO
from uuid import UUID

logger = logging.getLogger("prefect.mqi.gpu")  # where Prefect's get_logger('mqi.gpu') logs

REPLY_SECONDS = 1.0  # how long a giver waits for ACCEPT before it releases through the server
COMMIT_SECONDS = 2.0  # how long a receiver that accepted waits for COMMIT


class Offer(enum.Enum):
    HANDED = "the receiver holds the lease now"
    DECLINED = "the lease is still ours, and still renewed"
    GONE = "no process listens under that token any more"
    BROKEN = "we stopped renewing, but the commit did not reach the receiver: release the lease"


def _address(process: str) -> str:
    return f"\0mqi-gpu-handoff-{process}"


def _send(sock: socket.socket, message: dict[str, object]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _read(stream: BinaryIO) -> dict[str, object]:
    line = stream.readline(4096)
    if not line.endswith(b"\n"):
        raise ConnectionError("the peer closed the connection or sent too much")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ConnectionError(f"unexpected message {message!r}")
    return message


def offer(process: str, host: str, index: int, lease_id: UUID, before_commit: Callable[[], None]) -> Offer:
    """Offer the lease of GPU `index` of `host` to `process`; `before_commit` ends our hold on it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REPLY_SECONDS)
        try:
            sock.connect(_address(process))
        except (ConnectionRefusedError, FileNotFoundError):
            return Offer.GONE
        except OSError:
            return Offer.DECLINED
        try:
            _send(sock, {"offer": str(lease_id), "host": host, "gpu": index})
            reply = _read(sock.makefile("rb"))
        except (OSError, ValueError):  # includes the reply timeout: the receiver is stuck
            return Offer.DECLINED
        if reply.get("answer") != "accept":
            return Offer.DECLINED
        before_commit()
        try:
            _send(sock, {"commit": str(lease_id)})
        except OSError:  # the receiver closed first, so it never read the commit
            return Offer.BROKEN
        return Offer.HANDED


class HandoffPoint:
    """This process's socket for leases offered by other processes of this machine."""

    def __init__(
        self, process: str, host: str, accept: Callable[[], bool], receive: Callable[[UUID, int], None]
    ) -> None:
        self._host, self._accept, self._receive = host, accept, receive
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(_address(process))
        self._server.listen(8)
        threading.Thread(  # with our context: leases received here talk to the same server
            target=contextvars.copy_context().run,
            args=(self._serve,),
            name=f"mqi-gpu-handoff-{host}",
            daemon=True,
        ).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self._server.accept()
            with conn:
                try:
                    self._answer(conn)
                except Exception as error:  # the giver went away or spoke nonsense: keep listening
                    logger.debug("GPU hand-off on %s not completed: %s", self._host, error)

    def _answer(self, conn: socket.socket) -> None:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            logger.warning("refused a GPU hand-off from user id %s on %s", uid, self._host)
            return
        conn.settimeout(COMMIT_SECONDS)
        stream = conn.makefile("rb")
        message = _read(stream)
        lease_id, index = UUID(str(message["offer"])), int(str(message["gpu"]))
        if message.get("host") != self._host or not self._accept():
            _send(conn, {"answer": "decline"})
            return
        _send(conn, {"answer": "accept"})
        if _read(stream).get("commit") == str(lease_id):
            self._receive(lease_id, index)
