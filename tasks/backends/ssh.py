"""The SSH backend: the GPUs sit on an HPC node; each beam's job runs in its own folder there.

Job folder: `<ssh.remote_root>/<case id>/beam-NN/<input hash>/` holding
`input/` (the beam's staged input: `plan/`, `log/`, tasks/moqui/staging.py),
`moqui_tps.in` (its folders named for this folder), `dose/` (the engine's output)
and the job record (base.py). Uploads are checked by size
(SFTP) and sha256 (computed on the host); files already there with the right
hash are not sent again. Downloads go to `<dose file>.part`, optionally
zstd-compressed on the host, and are renamed only when size and sha256 match
what the job's wrapper recorded when the engine ended; a mismatch is
downloaded once more, then rejected. A download that cannot be stored here (a
full disk) fails the attempt but leaves the job's result alone: the next
attempt, or a rerun, downloads it again without running the engine again.

Case ids and beam names are untrusted text (spaces, quotes, unicode occur):
they only ever reach the host as shlex-quoted words, and names that cannot be
one path component (`/`, `\\`, control characters, `.`/`..`) are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import zstandard

from config.settings import Settings, SshSettings
from tasks.backends.base import (
    WRAPPER,
    WRAPPER_NAME,
    Backend,
    CommandResult,
    FetchError,
    Job,
    LaunchSpec,
    LocalWriteError,
)
from tasks.backends.sshconn import SecretLookup, SshHost, ssh_host
from tasks.common.errors import PermanentError, ToolError
from tasks.moqui.beam import TPS_NAME, BeamInput
from tasks.moqui.inputs import input_paths
from tasks.moqui.staging import staged_files, staged_folders

MAX_NAME_BYTES = 200


def check_name(beam: BeamInput, what: str, value: str) -> str:
    """`value` as one path component on the host, or PermanentError naming case and beam."""
    bad = (
        not value
        or value in (".", "..")
        or any(c in value for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
        or len(value.encode()) > MAX_NAME_BYTES
    )
    if bad:
        raise PermanentError(
            f"{beam.subject}: {what} {value!r} cannot name a folder or file "
            f"on the GPU host (empty, '.', '..', '/', '\\', control characters, over {MAX_NAME_BYTES} bytes)"
        )
    return value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SshBackend(Backend):
    kind = "ssh"

    def __init__(self, settings: Settings, secrets: SecretLookup | None = None) -> None:
        super().__init__(settings)
        self.host: SshHost = ssh_host(settings, secrets)  # the process's one connection to this host
        self.ssh: SshSettings = self.host.ssh

    @property
    def where(self) -> str:
        return f"host {self.host.label}"

    @property
    def poll_seconds(self) -> float:
        return self.ssh.poll_seconds

    @property
    def reconnect_seconds(self) -> float:
        return self.ssh.reconnect_seconds

    def run(self, script: str, timeout: float | None = None) -> CommandResult:
        return self.host.run(script, timeout)

    # -- layout ----------------------------------------------------------------
    def _job(self, beam: BeamInput) -> PurePosixPath:
        case = check_name(beam, "case id", beam.case_id)
        return PurePosixPath(self.ssh.remote_root) / case / f"beam-{beam.beam_number:02d}" / beam.input_hash

    def job_dir(self, beam: BeamInput) -> str:
        return str(self._job(beam))

    def case_jobs_pattern(self, case_id: str) -> str:
        return f"{shlex.quote(str(PurePosixPath(self.ssh.remote_root) / case_id))}/beam-*/*"

    def input_path(self, beam: BeamInput) -> str:
        return str(self._job(beam) / TPS_NAME)

    @property
    def engine_command(self) -> list[str]:
        return self.ssh.engine_command

    # -- uploads ---------------------------------------------------------------
    def _upload(self, beam: BeamInput, files: dict[str, bytes], folders: Sequence[str] = ()) -> None:
        """Make `files` (job-relative path -> content) exist in the job folder, verified by sha256."""
        job, q = self._job(beam), shlex.quote
        wanted = {rel: _sha256(data) for rel, data in files.items()}
        mkdir = " ".join(q(str(job / folder)) for folder in [".", *folders])
        hashes = " ".join(q(rel) for rel in wanted)
        check = (
            f"cd -- {q(str(job))} && for f in {hashes}; do "
            'if [ -f "$f" ]; then sha256sum < "$f"; else echo missing; fi; done'
        )

        def remote_hashes(script: str) -> dict[str, str]:
            result = self._checked(script, f"checking the inputs of job {job}")
            found = [line[:64] for line in result.stdout.decode("utf-8", "replace").splitlines()]
            return dict(zip(wanted, found, strict=True))

        have = remote_hashes(f"mkdir -p -- {mkdir} && {check}")
        send = [rel for rel in wanted if have[rel] != wanted[rel]]
        if not send:
            return
        self.host.upload([(io.BytesIO(files[rel]), len(files[rel]), str(job / rel)) for rel in send])
        have = remote_hashes(check)
        wrong = [rel for rel in send if have[rel] != wanted[rel]]
        if wrong:
            raise ToolError(
                f"{beam.subject}: upload to {self.where} did not verify "
                f"(sha256 differs after upload): {', '.join(str(job / rel) for rel in wrong)}"
            )

    def stage(self, beam: BeamInput) -> None:
        """The wrapper and the beam's staged input (its plan copy, log folders and layer CSVs)."""
        stage = Path(beam.stage_dir)
        files = {WRAPPER_NAME: WRAPPER}
        for path in staged_files(stage):
            files[f"input/{path.relative_to(stage).as_posix()}"] = path.read_bytes()
        folders = [f"input/{path.relative_to(stage).as_posix()}" for path in staged_folders(stage)]
        self._upload(beam, files, folders=[*folders, "dose"])

    def prepare_launch(self, beam: BeamInput, gpu: int, argv: list[str]) -> LaunchSpec:
        job = self._job(beam)
        text = beam.tps_text(
            gpu, paths=input_paths(self.settings.engine_profile, job / "input", job / "dose")
        )
        self._upload(beam, {TPS_NAME: text.encode()})
        return LaunchSpec(
            argv=argv,
            engine_dir=self.ssh.engine_dir,
            engine_dir_key="ssh.engine_dir",
            lock_dir=str(PurePosixPath(self.ssh.remote_root) / ".gpu-locks"),
            output_dir=str(job / "dose"),
            fresh_dirs=["dose"],
            env={name: os.environ[name] for name in self.ssh.forward_env if name in os.environ},
        )

    # -- downloads -------------------------------------------------------------
    def _compressed(self) -> bool:
        if self.ssh.compression == "auto":
            return self.host.has_command("zstd")
        return self.ssh.compression == "zstd"

    def download(self, remote: str, part: Path, compressed: bool) -> tuple[str, int]:
        """Stream `remote` into `part`; return the sha256 and size of what was written."""
        digest, size = hashlib.sha256(), 0
        inflate = zstandard.ZstdDecompressor().decompressobj() if compressed else None
        q = shlex.quote(remote)
        with part.open("wb") as out:

            def sink(chunk: bytes) -> None:
                nonlocal size
                data = inflate.decompress(chunk) if inflate is not None else chunk
                digest.update(data)
                out.write(data)
                size += len(data)

            try:
                result = self.host.stream(f"zstd -1 -q -c -- {q}" if compressed else f"cat -- {q}", sink)
            except zstandard.ZstdError as error:
                return f"(corrupt zstd stream: {error})", size
        if result.code != 0:
            raise FetchError(
                f"reading {remote} on {self.where} failed (exit {result.code}): {result.output()}"
            )
        return digest.hexdigest(), size

    def _output_name(self, beam: BeamInput, job: Job) -> str:
        """The one output the job's wrapper recorded that fits the engine's output name."""
        listed = self._checked(
            f"cd -- {shlex.quote(job.dir)} && ls -A -- sha256 2>/dev/null; true",
            f"listing the outputs of job {job.dir}",
        )
        names = listed.stdout.decode("utf-8", "replace").splitlines()
        name = beam.dose_match(names)
        if name is None:
            raise FetchError(
                f"{beam.subject}: the job in {job.dir} on {self.where} recorded no single output "
                f"{beam.dose_name} (recorded: {', '.join(names) or 'nothing'})"
            )
        return check_name(beam, "dose file name", name)

    def fetch(self, beam: BeamInput, job: Job) -> Path:
        name, q = self._output_name(beam, job), shlex.quote
        label = beam.subject
        recorded = self._checked(
            f"cd -- {q(job.dir)} && cat -- {q('sha256/' + name)}",
            f"reading the output record of job {job.dir}",
        )
        fields = recorded.stdout.decode("utf-8", "replace").split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise FetchError(f"{label}: the output record {job.dir}/sha256/{name} is unreadable: {fields!r}")
        expected = (fields[0], int(fields[1]))
        remote = f"{job.dir}/dose/{name}"
        final = beam.dose_dir / name
        part = final.with_name(final.name + ".part")
        final.parent.mkdir(parents=True, exist_ok=True)
        compressed = self._compressed()
        try:
            for _ in range(2):  # a mismatch is downloaded once more before the output is rejected
                got = self.download(remote, part, compressed)
                if got == expected:
                    os.replace(part, final)
                    return final
        except OSError as error:  # our side (a full disk, rights): the job's result is still good
            part.unlink(missing_ok=True)
            free = shutil.disk_usage(final.parent).free
            raise LocalWriteError(
                f"{label}: cannot store the dose here: {error.strerror or error} writing {part} "
                f"({expected[1]} bytes needed, {free} free there); the engine's result stays in "
                f"{job.dir} on {self.where} and is downloaded again by the next attempt or a rerun"
            ) from None
        finally:
            part.unlink(missing_ok=True)
        raise FetchError(
            f"{label}: {remote} on {self.where} is not what the job recorded: downloaded twice, got "
            f"{got[1]} bytes sha256 {got[0]}, expected {expected[1]} bytes sha256 {expected[0]}; not accepted"
        )

    def cleanup(self, beam: BeamInput, job: Job) -> None:
        if self.ssh.cleanup != "delete_on_success":
            self.mark_collected(job)
            return
        job_dir = PurePosixPath(job.dir)
        q = shlex.quote
        self._checked(
            f"rm -rf -- {q(str(job_dir))} && {{ rmdir -- {q(str(job_dir.parent))} "
            f"{q(str(job_dir.parent.parent))} 2>/dev/null; true; }}",
            f"removing job {job.dir}",
        )
