"""One SSH connection per GPU host per process: verified, shared, reconnected when it drops.

sshd's MaxStartups drops bursts of new connections, so every beam and every
poll shares one paramiko Transport per host; commands and transfers are
channels on it (at most `ssh.max_sessions` open at once, under sshd's
MaxSessions). Every step has its own timeout: TCP connect, banner, key
exchange and auth (`connect_timeout_seconds`), and the longest silence on
any channel (`command_timeout_seconds`). The host key must be in the
configured known_hosts file; an unknown or changed key is refused with its
SHA256 fingerprint and the command that trusts it. Keys only: a key file
(passphrase from the environment or a Prefect Secret block) and the keys of
a running ssh-agent; never passwords.

Bulk data comes through an exec channel (`cat`, or `zstd -c`) rather than
SFTP: paramiko's SFTP reader reached about half of OpenSSH's rate on
loopback, a plain channel about the same (benchmarks/transfer.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

import paramiko
from paramiko.ssh_exception import (
    AuthenticationException,
    BadAuthenticationType,
    ChannelException,
    IncompatiblePeer,
    PasswordRequiredException,
    SSHException,
)

from config.settings import Settings, SshSettings
from tasks.backends.base import CommandResult, ConnectionLost
from tasks.common.errors import PermanentError, ToolError

# A wide window and big packets let the server stream without waiting for us (measured).
WINDOW_SIZE = 16 * 2**20
MAX_PACKET_SIZE = 2**18
CHUNK = 4 * 2**20
# AES-GCM first: the fastest of paramiko's ciphers here (no separate MAC pass).
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
# paramiko starts a key re-exchange every 512 MiB; a channel closing during one deadlocks its
# transport thread (paramiko issue #822; seen here on a 512 MiB download). 16 GiB is still well
# below the 2^32 AES blocks after which OpenSSH itself re-keys.
REKEY_BYTES = 2**34
# known_hosts key type -> the host key algorithms that negotiate it
HOST_KEY_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}

T = TypeVar("T")
SecretLookup = Callable[[str], str]  # secret name -> value (e.g. a Prefect Secret block)


class HostKeyError(PermanentError):
    """The host's key is unknown or changed: never connect (retrying cannot fix it)."""


class AuthError(PermanentError):
    """No usable key, or the host refused every key offered."""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as `ssh-keygen -lf` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class SshHost:
    """The one connection to one host, opened on first use and again after it drops."""

    def __init__(
        self, ssh: SshSettings, key_file: Path | None, known_hosts: Path, secrets: SecretLookup | None = None
    ) -> None:
        self.ssh = ssh
        self.secrets = secrets
        self.key_file = key_file
        self.known_hosts = known_hosts
        self.label = f"{ssh.user}@{ssh.host}:{ssh.port}"
        self.connects = 0  # how many times a connection was opened (reconnects show here)
        self._lock = threading.Lock()
        self._transport: paramiko.Transport | None = None
        self._sessions = threading.BoundedSemaphore(ssh.max_sessions)
        self._commands: dict[str, bool] = {}

    # -- the connection ------------------------------------------------------
    def transport(self) -> paramiko.Transport:
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self._transport
            if self._transport is not None:
                self._transport.close()
                self._transport = None
            self._transport = self._connect()
            self.connects += 1
            return self._transport

    def _drop(self, transport: paramiko.Transport) -> None:
        """Forget a broken connection; the next call opens a new one."""
        with self._lock:
            if self._transport is transport:
                self._transport = None
        transport.close()

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    def _known_keys(self) -> dict[str, paramiko.PKey]:
        if not self.known_hosts.is_file():
            return {}
        try:
            keys = paramiko.HostKeys(str(self.known_hosts))
        except (OSError, SSHException, ValueError) as error:
            raise HostKeyError(f"cannot read known_hosts file {self.known_hosts}: {error}") from None
        found = keys.lookup(known_hosts_name(self.ssh.host, self.ssh.port))
        return dict(found) if found else {}

    def _connect(self) -> paramiko.Transport:
        ssh, timeout = self.ssh, self.ssh.connect_timeout_seconds
        known = self._known_keys()
        try:
            sock = socket.create_connection((ssh.host, ssh.port), timeout=timeout)
        except OSError as error:
            raise ConnectionLost(f"cannot connect to {self.label}: {error}") from None
        transport = paramiko.Transport(
            sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
        )
        try:
            transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout
            transport.packetizer.REKEY_BYTES = REKEY_BYTES
            options = transport.get_security_options()
            options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in options.ciphers) + tuple(
                c for c in options.ciphers if c not in PREFERRED_CIPHERS
            )
            if known:  # negotiate a key type known_hosts has, as OpenSSH does
                wanted = [a for name in known for a in HOST_KEY_ALGORITHMS.get(name, (name,))]
                options.key_types = tuple(a for a in options.key_types if a in wanted) or options.key_types
            try:
                transport.start_client(timeout=timeout)
            except IncompatiblePeer as error:
                raise HostKeyError(
                    f"{self.label} offers no host key of the types {self.known_hosts} has for it "
                    f"({', '.join(known)}): {error}"
                ) from None
            except (SSHException, EOFError, OSError) as error:
                raise ConnectionLost(f"SSH handshake with {self.label} failed: {error}") from None
            self._check_host_key(transport.get_remote_server_key(), known)
            self._authenticate(transport)
            if ssh.keepalive_seconds:
                transport.set_keepalive(max(1, round(ssh.keepalive_seconds)))
            return transport
        except BaseException:
            transport.close()
            raise

    def _check_host_key(self, key: paramiko.PKey, known: dict[str, paramiko.PKey]) -> None:
        name, entry = key.get_name(), known_hosts_name(self.ssh.host, self.ssh.port)
        if known.get(name) == key:
            return
        port = f"-p {self.ssh.port} " if self.ssh.port != 22 else ""
        keyscan_type = name.removeprefix("ssh-").split("-")[0]
        trust = f"ssh-keyscan {port}-t {keyscan_type} {self.ssh.host} >> {shlex.quote(str(self.known_hosts))}"
        offered = f"{name} {fingerprint(key)}"
        if not known:
            raise HostKeyError(
                f"host key of {entry} is unknown: it is not in {self.known_hosts}. The host offered "
                f"{offered}. Compare that with the host's own key (on the host: ssh-keygen -lf "
                f"/etc/ssh/ssh_host_{keyscan_type}_key.pub); if it matches, trust it with:\n  {trust}"
            )
        had = ", ".join(f"{n} {fingerprint(k)}" for n, k in known.items())
        raise HostKeyError(
            f"host key of {entry} has CHANGED: {self.known_hosts} has {had}, the host offered {offered}. "
            "Connection refused: this can be a man-in-the-middle attack. If the host was reinstalled and "
            f"its new key is {fingerprint(key)}, replace the old entry with:\n"
            f"  ssh-keygen -R {shlex.quote(entry)} -f {shlex.quote(str(self.known_hosts))} && {trust}"
        )

    def _passphrase(self) -> str | None:
        ssh = self.ssh
        if ssh.key_passphrase_env:
            value = os.environ.get(ssh.key_passphrase_env)
            if value is None:
                raise AuthError(
                    f"environment variable {ssh.key_passphrase_env} (ssh.key_passphrase_env) is not set"
                )
            return value
        if ssh.key_passphrase_secret_block:
            if self.secrets is None:
                raise AuthError(
                    f"the key passphrase is in Prefect Secret block {ssh.key_passphrase_secret_block!r} "
                    "(ssh.key_passphrase_secret_block), which only a command or run talking to the "
                    "Prefect server can read"
                )
            try:
                return self.secrets(ssh.key_passphrase_secret_block)
            except Exception as error:  # any failure to read the block is a configuration problem
                raise AuthError(
                    f"cannot read the key passphrase from Prefect Secret block "
                    f"{ssh.key_passphrase_secret_block!r} (ssh.key_passphrase_secret_block): {error}"
                ) from None
        return None

    def _load_key(self, path: Path) -> paramiko.PKey:
        try:
            passphrase = self._passphrase()
            return paramiko.PKey.from_path(path, None if passphrase is None else passphrase.encode())
        except FileNotFoundError:
            raise AuthError(f"key file {path} (ssh.key_file) does not exist") from None
        except PasswordRequiredException:
            raise AuthError(
                f"key file {path} is encrypted: name its passphrase's source in ssh.key_passphrase_env "
                "or ssh.key_passphrase_secret_block"
            ) from None
        except (SSHException, ValueError, OSError) as error:
            raise AuthError(f"cannot load key file {path} (wrong passphrase or format?): {error}") from None

    def _authenticate(self, transport: paramiko.Transport) -> None:
        offered: list[tuple[str, paramiko.PKey]] = []
        if self.key_file is not None:
            offered.append((str(self.key_file), self._load_key(self.key_file)))
        agent = paramiko.Agent() if self.ssh.allow_agent else None
        try:
            if agent is not None:
                offered += [(f"agent key {fingerprint(k)}", k) for k in agent.get_keys()]
            if not offered:
                raise AuthError(f"no key to log in to {self.label}: set ssh.key_file or start an ssh-agent")
            for _, key in offered:
                try:
                    transport.auth_publickey(self.ssh.user, key)
                    return
                except BadAuthenticationType as error:
                    allowed = ", ".join(error.allowed_types)
                    raise AuthError(
                        f"{self.label} does not accept public keys (it allows: {allowed})"
                    ) from None
                except AuthenticationException:
                    continue
                except (SSHException, EOFError, OSError) as error:
                    raise ConnectionLost(f"authenticating to {self.label} failed: {error}") from None
        finally:
            if agent is not None:
                agent.close()
        names = ", ".join(name for name, _ in offered)
        raise AuthError(
            f"{self.label} refused every key offered ({names}); is the public key in "
            f"~{self.ssh.user}/.ssh/authorized_keys there?"
        )

    # -- channels ------------------------------------------------------------
    @contextmanager
    def _session_slot(self) -> Iterator[paramiko.Transport]:
        if not self._sessions.acquire(timeout=self.ssh.command_timeout_seconds):
            raise ConnectionLost(
                f"all {self.ssh.max_sessions} SSH sessions to {self.label} stayed busy for "
                f"{self.ssh.command_timeout_seconds:g} s"
            )
        try:
            yield self.transport()
        finally:
            self._sessions.release()

    def _call(self, transport: paramiko.Transport, what: str, fn: Callable[..., T], *args: object) -> T:
        """Call a paramiko function; a broken connection becomes ConnectionLost (and is dropped)."""
        try:
            return fn(*args)
        except ChannelException as error:  # the server refused a channel; the connection is fine
            raise ConnectionLost(f"{self.label}: {what}: {error}") from None
        except (SSHException, EOFError, OSError) as error:  # OSError: socket errors and timeouts
            self._drop(transport)
            raise ConnectionLost(f"{self.label}: {what}: {error or type(error).__name__}") from None

    def stream(
        self, script: str, sink: Callable[[bytes], object], timeout: float | None = None
    ) -> CommandResult:
        """Run a POSIX-sh script; hand its stdout to `sink` as it arrives. stdout is not kept."""
        silence = timeout or self.ssh.command_timeout_seconds
        what = f"running {script[:80]!r}"
        with self._session_slot() as transport:
            channel = self._call(transport, what, transport.open_session, None, None, silence)
            try:
                channel.settimeout(silence)
                # `sh -c`: the script means the same whatever the user's login shell is.
                self._call(transport, what, channel.exec_command, "sh -c " + shlex.quote(script))
                self._call(transport, what, channel.shutdown_write)  # stdin: empty, as from /dev/null
                while data := self._call(transport, what, channel.recv, CHUNK):
                    sink(data)
                stderr = bytearray()
                while data := self._call(transport, what, channel.recv_stderr, CHUNK):
                    stderr += data
                ended = channel.status_event.wait(silence)
                if not ended or (channel.exit_status == -1 and not transport.is_active()):
                    self._drop(transport)  # output may be cut short: never judge it
                    raise ConnectionLost(f"{self.label}: {what}: the connection ended before the command")
                return CommandResult(channel.exit_status, b"", bytes(stderr))
            finally:
                channel.close()

    def run(self, script: str, timeout: float | None = None) -> CommandResult:
        out = bytearray()
        result = self.stream(script, out.extend, timeout)
        return CommandResult(result.code, bytes(out), result.stderr)

    def has_command(self, name: str) -> bool:
        """Whether `name` is on the host's PATH (asked once per process)."""
        if name not in self._commands:
            self._commands[name] = self.run(f"command -v {shlex.quote(name)}").code == 0
        return self._commands[name]

    def upload(self, files: list[tuple[BinaryIO, int, str]]) -> None:
        """SFTP (stream, size, remote path) each; paramiko checks the size written (confirm)."""
        what = "SFTP upload"
        with self._session_slot() as transport:
            sftp = self._call(transport, what, paramiko.SFTPClient.from_transport, transport)
            try:
                sftp.get_channel().settimeout(self.ssh.command_timeout_seconds)
                for stream, size, remote in files:
                    try:
                        sftp.putfo(stream, remote, size, None, True)
                    except (SSHException, EOFError, TimeoutError, ConnectionError) as error:
                        self._drop(transport)
                        raise ConnectionLost(f"{self.label}: upload of {remote}: {error}") from None
                    except OSError as error:  # the host refused the file (space, rights) or its size
                        raise ToolError(f"{self.label}: upload of {remote} failed: {error}") from None
            finally:
                sftp.close()


_hosts: dict[tuple[str, str, str], SshHost] = {}
_hosts_lock = threading.Lock()


def ssh_host(settings: Settings, secrets: SecretLookup | None = None) -> SshHost:
    """The process's connection to the configured host (one per distinct ssh: section).

    `secrets` reads a secret by name (a Prefect Secret block), for a key passphrase kept there.
    """
    ssh = settings.ssh
    if ssh is None:
        raise PermanentError("backend.kind is ssh but there is no ssh: section")
    key_file = settings.config_path(ssh.key_file) if ssh.key_file else None
    known_hosts = settings.config_path(ssh.known_hosts)
    ident = (ssh.model_dump_json(), str(key_file), str(known_hosts))
    with _hosts_lock:
        if ident not in _hosts:
            _hosts[ident] = SshHost(ssh, key_file, known_hosts, secrets)
        return _hosts[ident]


def close_all() -> None:
    """Close every connection (tests; a long-running process just keeps them)."""
    with _hosts_lock:
        for host in _hosts.values():
            host.close()
        _hosts.clear()
