"""The backend seam: where a beam's engine runs, and the job record that makes that place the truth.

A beam's engine runs as a *job* in a deterministic job folder (SSH:
`<remote root>/<case id>/beam-NN/<input hash>/`). The small POSIX-sh wrapper
`mqi-job.sh`, started detached (setsid, stdin from /dev/null), writes the
record there: `job.json` (host, pid, GPU, start time), `engine.log`,
`engine.pid` (the engine's process group), `engine.ended` (the engine has exited,
its GPU is free), the sha256 of every output and, last, `exit.json`. The run that
launches or adopts a job adds `holder.json` (Holder: which flow run holds it, under
which GPU lease), so that another run can tell whether the holder is gone. Before launching, a beam
looks the record up: a running job is adopted, a finished one fetched, only
a missing or failed one is launched. So a killed worker, a restarted server
or a rerun never starts a second copy of a job that is still on a GPU
(the remote side tells the truth).

Local and SSH backends share everything here (the wrapper, the launch, probe
and stop scripts, reading the record, following the log, rejecting a result);
they differ only in how a shell script runs (`sh -c` here, an SSH exec
channel there), where a case's job folders are, and how files get to and from
the job folder. Every value in a script goes through `shlex.quote`.

A backend whose jobs are not process groups on the host (a batch scheduler)
overrides `stop` (e.g. `scancel` of the job id it recorded) and keeps the rest:
cancelling a case (deployments/reconcile.py) needs only `jobs_of_case`,
`holder` and `stop`.
"""

from __future__ import annotations

import json
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from importlib.resources import files
from pathlib import Path

from config.settings import Settings
from tasks.common import stopping
from tasks.common.errors import PermanentError, ToolError
from tasks.common.toolrun import LineFollower, ToolRun
from tasks.moqui.beam import BeamInput
from tasks.moqui.command import engine_argv

WRAPPER_NAME = "mqi-job.sh"
WRAPPER = files("tasks.backends").joinpath(WRAPPER_NAME).read_bytes()
LAUNCH_WAIT_SECONDS = 10.0  # the launch command waits this long for the wrapper's job.json
PROBE_STEP_SECONDS = 0.05  # a waiting probe looks for the job's end this often
PROBE_TIMEOUT_SECONDS = 30.0  # a waiting probe may take this long beyond its wait
# Exit codes of the launch command (the engine's own codes never reach it).
EXIT_NO_JOB_DIR, EXIT_NO_ENGINE_DIR, EXIT_NO_ENGINE, EXIT_NOT_STARTED = 90, 91, 92, 93
# One attempt's record, removed before the next launch.
RECORD_FILES = (
    "job.json engine.ended exit.json rejected collected cancelled pid engine.pid holder.json "
    "sha256 engine.log"
)
STOP_WAIT_SECONDS = 10.0  # a stopped engine has this long after SIGTERM before SIGKILL
TIMEOUT_EXITS = (124, 137)  # timeout(1): the engine ended on SIGTERM / needed SIGKILL
LOST = "its wrapper is gone without an exit record (killed, or the host rebooted)"


class JobState(Enum):
    MISSING = "missing"  # no job, or one whose result was collected already: launch
    RUNNING = "running"
    FINISHED_OK = "finished-ok"  # exit 0; the engine judge and the download still decide
    FINISHED_FAILED = "finished-failed"  # non-zero exit, lost, or its result was rejected


class ConnectionLost(ToolError):
    """The GPU host could not be reached or the connection dropped: reconnecting may help."""


class FetchError(ToolError):
    """A finished job's output could not be downloaded intact; its result is rejected."""


class LocalWriteError(ToolError):
    """A finished job's output could not be stored here (e.g. the disk is full).

    The result on the GPU host is intact, so it is not rejected: the next attempt, or a
    rerun once there is space, downloads it again instead of running the engine again.
    """


@dataclass(frozen=True)
class CommandResult:
    code: int
    stdout: bytes
    stderr: bytes

    def output(self) -> str:
        """stderr then stdout, for error messages."""
        return (self.stderr + self.stdout).decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class Queued:
    """A batch scheduler's view of a job (Slurm): its id, its state there and why it waits."""

    job_id: str
    state: str = ""  # PENDING, RUNNING, COMPLETED, TIMEOUT, ... ("" before the scheduler was asked)
    reason: str = ""  # why a pending job waits (Resources, Priority, ...)
    retry: bool = True  # a job that ended in this state without an exit record may be run again
    since: float | None = None  # when it was submitted from here (None: adopted)

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"


@dataclass(frozen=True)
class Job:
    """What a job folder says about its job (see mqi-job.sh)."""

    dir: str
    state: JobState
    host: str = ""
    pid: int | None = None
    gpu: int = -1  # -1: no record
    started: float | None = None
    timeout: float | None = None
    exit_code: int | None = None
    ended: float | None = None
    problem: str | None = None  # why it failed without an exit code: lost, or rejected and why
    engine_ended: bool = False  # RUNNING only: the engine has exited, the wrapper hashes its output
    queued: Queued | None = None  # submitted to a batch scheduler (Slurm): what it says

    @property
    def timed_out(self) -> bool:
        """timeout(1) ended it: its exit code says so and it ran for the whole limit."""
        if self.exit_code not in TIMEOUT_EXITS or None in (self.started, self.ended, self.timeout):
            return False
        return self.ended - self.started >= self.timeout - 1  # type: ignore[operator]


@dataclass(frozen=True)
class LaunchSpec:
    """How to start the engine of one beam in its job folder."""

    argv: list[str]
    engine_dir: str
    engine_dir_key: str  # the config key naming engine_dir, for error messages
    lock_dir: str  # holds gpu-<index>.lock: one engine per GPU on that host
    output_dir: str = ""  # outputs hashed by the wrapper (empty: none, they are not downloaded)
    fresh_dirs: list[str] = field(default_factory=list)  # emptied first: an earlier run's outputs
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Holder:
    """Who holds a running job's GPU: `holder.json` in its job folder, written by the run that
    launched or adopted it. Opaque to the backends.

    `run` is the holder's flow run, `attempt` that run's run count (a Retry of the same run
    counts up, so an earlier attempt of one's own run is a holder that is gone), `lease` the
    GPU lease on the Prefect server, `gpu` the GPU it leases, `beam` the beam's label. A job of
    a capped Slurm queue records the lease of its place in that queue instead (`gpu` 0).
    """

    run: str
    attempt: int
    gpu: int
    lease: str
    beam: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Holder | None:
        """The record, or None if it is unreadable (a holder that cannot be named is treated as alive)."""
        try:
            data = json.loads(text)
            run, attempt, gpu, lease = data["run"], data["attempt"], data["gpu"], data["lease"]
            beam = str(data.get("beam", ""))
            return cls(run=str(run), attempt=int(attempt), gpu=int(gpu), lease=str(lease), beam=beam)
        except (ValueError, KeyError, TypeError):
            return None


def _seconds(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def wrapper_words(gpu: str, timeout: float, spec: LaunchSpec) -> str:
    """The wrapper's arguments, each quoted: `gpu` is a shell word, quoted by the caller."""
    q = shlex.quote
    rest = [_seconds(timeout), spec.engine_dir, spec.output_dir, spec.lock_dir, *spec.argv]
    return " ".join([gpu, *(q(arg) for arg in rest)])


def launch_checks(job_dir: str, spec: LaunchSpec, extra_records: str = "") -> str:
    """cd into `job_dir`, check the engine is there, clear the last attempt's record and outputs."""
    q = shlex.quote
    engine_dir = q(spec.engine_dir)
    return (
        f"cd -- {q(job_dir)} || exit {EXIT_NO_JOB_DIR}; "
        f"[ -d {engine_dir} ] || exit {EXIT_NO_ENGINE_DIR}; "
        f"(cd -- {engine_dir} && command -v {q(spec.argv[0])}) >/dev/null 2>&1 || exit {EXIT_NO_ENGINE}; "
        f"mkdir -p -- {q(spec.lock_dir)} && "
        f"rm -rf -- {RECORD_FILES} {extra_records} {' '.join(q(p) for p in spec.fresh_dirs)} && "
        f"mkdir -p -- . {' '.join(q(p) for p in spec.fresh_dirs)}; "
    )


def launch_script(job_dir: str, gpu: int, timeout: float, spec: LaunchSpec) -> str:
    """Start the wrapper detached in `job_dir`, wait for its job.json and print it (one line)."""
    q = shlex.quote
    assignments = " ".join(q(f"{name}={value}") for name, value in spec.env.items())
    polls = int(LAUNCH_WAIT_SECONDS / 0.05)
    return (
        launch_checks(job_dir, spec)
        + f"env {assignments} setsid sh {WRAPPER_NAME} {wrapper_words(str(gpu), timeout, spec)} "
        "</dev/null >/dev/null 2>&1 & "
        f"i=0; while [ ! -f job.json ] && [ $i -lt {polls} ]; do sleep 0.05; i=$((i + 1)); done; "
        f"[ -f job.json ] || exit {EXIT_NOT_STARTED}; head -n 1 job.json"
    )


# Sets p to the wrapper's pid; true while it runs (not a zombie, and the host has not rebooted since).
ALIVE = (
    "alive() { [ -f pid ] && read -r p b < pid && read -r _ _ s _ < /proc/$p/stat 2>/dev/null "
    '&& [ "$s" != Z ] && [ "$b" = "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)" ]; }; '
)


def probe_script(job_dir: str, log_offset: int | None, wait: float = 0.0) -> str:
    """Print the job record (or `missing`), then its state line, then the log from `log_offset`.

    The state line is `running`, `finishing` (the engine has exited, the wrapper is still at work),
    `lost`, `collected`, `rejected <why>`, `cancelled <why>` (stopped, and over) or exit.json.
    Alive means: the wrapper's pid exists, is no zombie, and the host has not rebooted since it
    started. With `wait`, a running job is first
    watched for up to that many seconds and the probe answers within PROBE_STEP_SECONDS of its next
    step (the engine's exit, then the job's end): the GPU is free for the next beam that much sooner
    than a poll allows.
    """
    log = "" if log_offset is None else f"; tail -c +{log_offset + 1} engine.log 2>/dev/null || true"
    steps = max(1, round(wait / PROBE_STEP_SECONDS)) if wait > 0 else 0  # never a probe loop without a pause
    watch = (
        "[ -f pid ] && read -r p _ < pid && { [ -f engine.ended ] && next=exit.json || next=engine.ended; } "
        f"&& i=0 && while [ $i -lt {steps} ] && [ ! -f exit.json ] && [ ! -f $next ] "
        f"&& [ -e /proc/$p ]; do sleep {PROBE_STEP_SECONDS:g}; i=$((i + 1)); done; "
        if steps
        else ""
    )
    return (
        f"cd -- {shlex.quote(job_dir)} 2>/dev/null && [ -f job.json ] || {{ echo missing; exit 0; }}; "
        + watch
        + "head -n 1 job.json; "
        + ALIVE
        + "if [ -f collected ]; then echo collected; "
        "elif [ -f rejected ]; then printf 'rejected %s\\n' \"$(head -n 1 rejected)\"; "
        "elif [ -f cancelled ] && ! alive; then printf 'cancelled %s\\n' \"$(head -n 1 cancelled)\"; "
        "elif [ ! -f exit.json ] && alive; then [ -f engine.ended ] && echo finishing || echo running; "
        "elif [ -f exit.json ]; then head -n 1 exit.json; else echo lost; fi" + log
    )


def stop_script(job_dir: str, reason: str) -> str:
    """Stop a running job: mark it cancelled, SIGTERM the engine's process group, SIGKILL what is left.

    Prints `stopped`, or `ended` when there was nothing to stop (no job, already over, or its
    engine already exited: a finished result is kept for a later run to collect). The marker
    comes first, so a later run relaunches the job instead of adopting it. The wrapper is left
    to write its exit record when the engine dies of SIGTERM; a wrapper still waiting for the
    GPU's lock (no engine yet) is terminated itself.
    """
    q = shlex.quote
    first_line = (reason.strip().splitlines() or ["cancelled"])[0][:300]
    polls = int(STOP_WAIT_SECONDS / PROBE_STEP_SECONDS)
    return (
        f"cd -- {q(job_dir)} 2>/dev/null && [ -f job.json ] || {{ echo ended; exit 0; }}; "
        + ALIVE
        + "if [ -f exit.json ] || [ -f engine.ended ] || ! alive; then echo ended; exit 0; fi; "
        f"printf '%s\\n' {q(first_line)} > cancelled; "
        "e=; [ -f engine.pid ] && read -r e < engine.pid; "
        'if [ -n "$e" ]; then kill -s TERM -- "-$e" "$e" 2>/dev/null; '
        'else kill -s TERM -- "-$p" 2>/dev/null; fi; '
        f"i=0; while alive && [ $i -lt {polls} ]; do sleep {PROBE_STEP_SECONDS:g}; i=$((i + 1)); done; "
        'if alive; then kill -s KILL -- "-$p" ${e:+"-$e" "$e"} 2>/dev/null; fi; '
        "echo stopped"
    )


def _record(job_dir: str, line: bytes) -> Job:
    try:
        record = json.loads(line)
        return Job(
            dir=job_dir,
            state=JobState.RUNNING,
            host=str(record["host"]),
            pid=int(record["pid"]),
            gpu=int(record["gpu"]),
            started=float(record["started"]),
            timeout=float(record["timeout"]),
        )
    except (ValueError, KeyError, TypeError) as bad:
        raise ToolError(f"job record {job_dir}/job.json is unreadable ({bad}): {line[:200]!r}") from None


def parse_probe(job_dir: str, output: bytes) -> tuple[Job, bytes]:
    """The Job a probe describes, and the log bytes it carried."""
    head, _, rest = output.partition(b"\n")
    if head.strip() == b"missing":
        return Job(job_dir, JobState.MISSING), b""
    job = _record(job_dir, head)
    status, _, log = rest.partition(b"\n")
    text = status.decode("utf-8", "replace").strip()
    if text == "running":
        return job, log
    if text == "finishing":
        return replace(job, engine_ended=True), log
    if text == "collected":  # a later run of the same inputs is a new job (e.g. a forced rerun)
        return replace(job, state=JobState.MISSING), log
    if text == "lost":
        return replace(job, state=JobState.FINISHED_FAILED, problem=LOST), log
    if text.startswith("rejected"):
        reason = text.removeprefix("rejected").strip()
        return replace(job, state=JobState.FINISHED_FAILED, problem=f"its result was rejected: {reason}"), log
    if text.startswith("cancelled"):
        reason = text.removeprefix("cancelled").strip()
        return replace(job, state=JobState.FINISHED_FAILED, problem=f"it was stopped: {reason}"), log
    try:
        ended = json.loads(text)
        code, end = int(ended["exit"]), float(ended["ended"])
    except (ValueError, KeyError, TypeError):
        raise ToolError(f"exit record {job_dir}/exit.json is unreadable: {text[:200]!r}") from None
    state = JobState.FINISHED_OK if code == 0 else JobState.FINISHED_FAILED
    return replace(job, state=state, exit_code=code, ended=end), log


class Backend(ABC):
    """Where engines run. Subclasses say how a script runs there and how files get there and back."""

    kind: str
    gpu_leases = True  # False: a scheduler allocates the GPUs (Slurm); beams take no GPU lease
    queue_slots = False  # True: a beam holds a place in the scheduler's capped queue until its job ended

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # -- what differs between backends ---------------------------------------
    @property
    @abstractmethod
    def where(self) -> str:
        """The machine, for messages: `host hpc1 (user@hpc1:22)`."""

    @property
    @abstractmethod
    def poll_seconds(self) -> float: ...

    @property
    def reconnect_seconds(self) -> float:
        """How long following a job keeps trying after ConnectionLost (0: not at all)."""
        return 0.0

    @abstractmethod
    def run(self, script: str, timeout: float | None = None) -> CommandResult:
        """Run a POSIX-sh script on the machine; ConnectionLost if it cannot be reached."""

    @abstractmethod
    def job_dir(self, beam: BeamInput) -> str: ...

    @abstractmethod
    def case_jobs_pattern(self, case_id: str) -> str:
        """A shell glob (its fixed part quoted) matching every job folder of a case's beams."""

    @abstractmethod
    def stage(self, beam: BeamInput) -> None:
        """Put the wrapper and the beam's staged input where the engine reads it (no GPU held yet)."""

    @abstractmethod
    def prepare_launch(self, beam: BeamInput, gpu: int, argv: list[str]) -> LaunchSpec:
        """Write moqui_tps.in for `gpu` where the engine reads it (`input_path`); say how to start it."""

    @abstractmethod
    def input_path(self, beam: BeamInput) -> str:
        """Where the engine reads the beam's moqui_tps.in: in its job folder."""

    @property
    @abstractmethod
    def engine_command(self) -> list[str]:
        """The engine's command template on this machine (engine.command or ssh.engine_command)."""

    def engine_argv(self, beam: BeamInput, gpu: int) -> list[str]:
        """The engine's argv for `beam` on `gpu`, reading its moqui_tps.in in the job folder."""
        return engine_argv(self.engine_command, beam, gpu, self.input_path(beam))

    @abstractmethod
    def fetch(self, beam: BeamInput, job: Job) -> Path:
        """Bring the dose file of a finished job into beam.dose_dir, verified, and return it.

        The job must have written exactly one file that fits the engine's output name
        (beam.dose_name); FetchError if it did not, or if it cannot be brought back intact.
        """

    @abstractmethod
    def cleanup(self, beam: BeamInput, job: Job) -> None:
        """After a verified download: remove what the job left, per policy."""

    # -- shared job-record logic ---------------------------------------------
    def _checked(self, script: str, what: str, timeout: float | None = None) -> CommandResult:
        result = self.run(script, timeout)
        if result.code != 0:
            raise ToolError(f"{what} failed on {self.where} (exit {result.code}): {result.output()}")
        return result

    def probe(self, job: Job, log_offset: int | None = None, wait: float = 0.0) -> tuple[Job, bytes]:
        """The job's state and new log; with `wait`, not before it ends or `wait` seconds pass."""
        result = self._checked(
            probe_script(job.dir, log_offset, wait),
            f"reading job {job.dir}",
            timeout=wait + PROBE_TIMEOUT_SECONDS if wait else None,
        )
        return parse_probe(job.dir, result.stdout)

    def describe(self, job: Job) -> str:
        """Where the job runs, for the beam's log: `on GPU 1 of hpc1 (pid 42, <job folder>)`."""
        return f"on GPU {job.gpu} of {job.host} (pid {job.pid}, {job.dir})"

    def waiting(self, job: Job) -> str | None:
        """Why a job waits in a scheduler's queue (`Slurm job 12 pending: Resources`); None: it does not."""
        return None

    def left_queue(self, job: Job) -> bool:
        """Return once a scheduler no longer lists the ended job as queued or running (its place is
        free); whether it was a scheduler's job. A process on a host is in no queue."""
        return job.queued is not None

    def news(self, before: Job, after: Job) -> str | None:
        """What changed between two probes that the beam's log should say (a scheduler's queue state)."""
        return None

    def stop_case(self, case_id: str) -> list[str]:
        """Stop the case's jobs that still run (its run was cancelled); return the ids stopped.

        Only a scheduler's jobs are stopped here (Slurm); local and SSH jobs are left alone.
        """
        return []

    def lookup(self, beam: BeamInput) -> Job:
        """The job of this beam's inputs, as its folder tells it (MISSING if there is none)."""
        return self.probe(Job(self.job_dir(beam), JobState.MISSING))[0]

    def launch(self, beam: BeamInput, gpu: int, argv: list[str]) -> Job:
        """Start the engine (`argv`) detached on `gpu`; return the job once its record exists."""
        spec = self.prepare_launch(beam, gpu, argv)
        job_dir = self.job_dir(beam)
        result = self.run(self.launch_script(beam, job_dir, gpu, spec), timeout=LAUNCH_WAIT_SECONDS + 30)
        where = f"{beam.subject} on {self.where}"
        if result.code == EXIT_NO_ENGINE_DIR:
            raise PermanentError(
                f"{where}: engine directory {spec.engine_dir} does not exist ({spec.engine_dir_key})"
            )
        if result.code == EXIT_NO_ENGINE:
            raise PermanentError(f"{where}: cannot start the engine: {spec.argv[0]!r} not found")
        if result.code != 0:
            raise ToolError(
                f"{where}: launching the job in {job_dir} failed (exit {result.code}): {result.output()}"
            )
        return self.launched(job_dir, result.stdout.strip())

    def launch_script(self, beam: BeamInput, job_dir: str, gpu: int, spec: LaunchSpec) -> str:
        """The script that starts the job and prints what `launched` reads."""
        return launch_script(job_dir, gpu, self.settings.engine.timeout_seconds, spec)

    def launched(self, job_dir: str, output: bytes) -> Job:
        """The job a successful launch script described (its job.json line)."""
        return _record(job_dir, output)

    def _mark(self, job: Job, marker: str, text: str) -> None:
        first_line = (text.strip().splitlines() or [marker])[0][:300]
        q = shlex.quote
        self._checked(
            f"cd -- {q(job.dir)} && printf '%s\\n' {q(first_line)} > {marker}", f"marking job {job.dir}"
        )

    def hold(self, job: Job, holder: Holder) -> None:
        """Record who holds the job's GPU now (holder.json), replacing an earlier holder."""
        q = shlex.quote
        self._checked(
            f"cd -- {q(job.dir)} && printf '%s\\n' {q(holder.to_json())} > holder.json.tmp "
            "&& mv -f holder.json.tmp holder.json",
            f"recording the holder of job {job.dir}",
        )

    def holder(self, job: Job) -> Holder | None:
        """Who holds the job's GPU, as its holder.json says (None: no record, or unreadable)."""
        result = self._checked(
            f"cd -- {shlex.quote(job.dir)} && cat holder.json 2>/dev/null; true",
            f"reading the holder of job {job.dir}",
        )
        text = result.stdout.decode("utf-8", "replace").strip()
        return Holder.from_json(text) if text else None

    def jobs_of_case(self, case_id: str) -> list[Job]:
        """Every job a case's beams have on this backend (any state), as their folders tell it."""
        listed = self._checked(
            f'for d in {self.case_jobs_pattern(case_id)}; do [ -f "$d/job.json" ] && printf \'%s\\n\' "$d"; '
            "done; true",
            f"listing the jobs of case {case_id}",
        )
        dirs = listed.stdout.decode("utf-8", "surrogateescape").splitlines()
        return [self.probe(Job(job_dir, JobState.MISSING))[0] for job_dir in dirs]

    def stop(self, job: Job, reason: str) -> bool:
        """Stop a running job and mark it cancelled (a later run relaunches it); whether it was stopped.

        False when there was nothing to stop: it had ended, or its engine had exited (the GPU is
        free and the result is kept). The shared implementation kills the job's process groups on
        the host (the wrapper's, and the engine's under timeout(1)); a batch-scheduler backend
        overrides it (cancel the job it recorded, then mark the job folder as `stop_script` does).
        """
        result = self._checked(
            stop_script(job.dir, reason), f"stopping job {job.dir}", timeout=STOP_WAIT_SECONDS + 30
        )
        return result.stdout.strip().endswith(b"stopped")

    def reject(self, job: Job, reason: str) -> None:
        """Mark a finished job's result as not acceptable, so the next attempt launches it again."""
        self._mark(job, "rejected", reason)

    def mark_collected(self, job: Job) -> None:
        """The job's result is safely here: a later lookup must not hand it out again as pending."""
        self._mark(job, "collected", "dose downloaded and verified")


@dataclass
class Followed:
    """A job followed to its end: the final record, the run as the engine judge sees it, all lines."""

    job: Job
    run: ToolRun
    lines: list[str]


def _probe_patiently(
    backend: Backend, job: Job, offset: int, notify: Callable[[str], None] | None
) -> tuple[Job, bytes]:
    """probe(), reconnecting for up to backend.reconnect_seconds while the host is unreachable."""
    lost_since: float | None = None
    while True:
        try:
            return backend.probe(job, offset, wait=backend.poll_seconds)
        except ConnectionLost as lost:
            now = time.monotonic()
            lost_since = now if lost_since is None else lost_since
            if now - lost_since >= backend.reconnect_seconds:
                raise ConnectionLost(
                    f"{lost}; gave up following job {job.dir} after {backend.reconnect_seconds:g} s"
                ) from None
            if notify is not None:
                notify(f"lost {backend.where} while following job {job.dir}: {lost}; reconnecting")
            time.sleep(backend.poll_seconds)


def follow(
    backend: Backend,
    job: Job,
    argv: list[str],
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    notify: Callable[[str], None] | None = None,
    engine_ended: Callable[[], None] | None = None,
    on_job: Callable[[Job], None] | None = None,
) -> Followed:
    """Mirror the job's log into `log_path` (lines to `on_line`, each probed record to `on_job`)
    until the job is over.

    `engine_ended` is called once, as soon as the engine has exited (its GPU is free), which
    for a large dose is seconds before the wrapper has hashed it and the job is over.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run = ToolRun(argv=argv, log_path=log_path, started=job.started or time.time())
    lines: list[str] = []
    offset = 0
    with log_path.open("wb") as mirror:
        follower = LineFollower(log_path)

        def consume(final: bool = False) -> None:
            for line in follower.new_lines(final):
                lines.append(line)
                run.tail.append(line)
                if on_line is not None:
                    on_line(line)

        try:
            while True:
                stopping.check(f"following job {job.dir} (it goes on; the next run adopts it)", True)
                before = job
                job, data = _probe_patiently(backend, job, offset, notify)
                news = backend.news(before, job)
                if on_job is not None:
                    on_job(job)
                if news is not None and notify is not None:
                    notify(news)
                if engine_ended is not None and (job.engine_ended or job.state is not JobState.RUNNING):
                    engine_ended()  # first: consuming lines may wait on the server (progress bar)
                    engine_ended = None
                mirror.write(data)
                mirror.flush()
                offset += len(data)
                consume()
                if job.state is not JobState.RUNNING:
                    break
        finally:
            consume(final=True)
            follower.close()
    if job.state is JobState.MISSING:
        job = replace(job, problem="its job folder disappeared while it ran")
    run.returncode = job.exit_code
    run.timed_out = job.timed_out
    run.ended = job.ended or time.time()
    return Followed(job=job, run=run, lines=lines)
