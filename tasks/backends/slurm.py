"""The Slurm backend: every beam is a Slurm batch job; Slurm allocates its GPU, no lease is taken here.

The job folder and its record are the local and SSH backends' (base.py): the batch
script `slurm-job.sh`, written into the beam's job folder, runs the same wrapper
`mqi-job.sh` in the allocation, so `job.json`, `engine.log`, `exit.json` and the output
hashes mean what they mean everywhere. Added here: `slurm.id` (the job id sbatch
answered, written before anything else can look) and `slurm.out` (the batch script's
own output: the allocated GPU, and Slurm's messages such as a time-limit kill).

Adopt, don't resubmit: a beam's job folder with a `slurm.id` is asked about first.
Slurm says whether the job is still queued or running (squeue), or how it ended
(squeue while it remembers the job, then `sacct`, then `sacct -c`: the jobcomp file,
for sites without slurmdbd); a job whose engine exited is judged by its exit record as
on every backend. A job that ended without one (TIMEOUT, CANCELLED, NODE_FAIL, ...)
fails its beam with the state in the message; `slurm.retry_states` says which of those
states are retried.

The engine sees only its allocated GPU, as CUDA device 0: its GPUID is 0 by
construction; the physical GPU (SLURM_JOB_GPUS) is what the record and the log show.

Every Slurm command runs under `timeout` (they block while slurmctld is down): a
command that does not answer is ConnectionLost, which following a job rides out
for `slurm.unreachable_seconds`. Commands run here (the orchestrator on a login
node: SlurmLocalBackend) or on the login node over SSH (an `ssh:` section:
SlurmSshBackend); every value goes through `shlex.quote`.
"""

from __future__ import annotations

import math
import re
import shlex
import time
from dataclasses import dataclass, replace

from config.settings import SlurmSettings
from tasks.backends.base import (
    LOST,
    WRAPPER_NAME,
    Backend,
    CommandResult,
    ConnectionLost,
    Job,
    JobState,
    LaunchSpec,
    Queued,
    launch_checks,
    parse_probe,
    probe_script,
    wrapper_words,
)
from tasks.backends.local import LocalBackend
from tasks.backends.ssh import SshBackend
from tasks.common.errors import ToolError
from tasks.moqui.beam import BeamInput

ALLOCATED_GPU = 0  # the engine's GPUID: its one allocated GPU is CUDA device 0
BATCH_NAME = "slurm-job.sh"
SLURM_RECORDS = "slurm.id slurm.out"
# States of a job Slurm still works on; any other is an end state.
ACTIVE = frozenset(
    "PENDING CONFIGURING RUNNING COMPLETING SUSPENDED REQUEUED REQUEUE_FED REQUEUE_HOLD RESIZING "
    "SIGNALING STAGE_OUT STOPPED RESV_DEL_HOLD".split()
)
UNKNOWN = "unknown"
LEFT_QUEUE_POLL_SECONDS = 0.2
# End states: COMPLETED, and the failures a beam's message names.
SLURM_ENDS = frozenset(
    "COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY PREEMPTED BOOT_FAIL DEADLINE".split()
)


def time_limit_minutes(settings: SlurmSettings, engine_timeout: float) -> int:
    """sbatch --time: the configured minutes, else the engine's limit plus 5 minutes, rounded up."""
    return settings.time_limit_minutes or math.ceil(engine_timeout / 60) + 5


def job_name(beam: BeamInput) -> str:
    """What squeue shows: `mqi-<case, letters and digits only>-beam-NN`."""
    case = re.sub(r"[^A-Za-z0-9_.-]", "_", beam.case_id)[:40]
    return f"mqi-{case}-beam-{beam.beam_number:02d}"


def batch_script(extra_sbatch: list[str], gpu_words: str, env: str) -> str:
    """The batch script: say which GPU Slurm gave, then run the wrapper (`gpu_words`: its arguments)."""
    return "\n".join(
        [
            "#!/bin/sh",
            *(f"#SBATCH {line}" for line in extra_sbatch),
            "# MQI Communicator: one beam's engine run (tasks/backends/slurm.py). The wrapper records",
            "# the physical GPU (SLURM_JOB_GPUS); the engine sees it as CUDA device 0.",
            "gpu=${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:--1}}; gpu=${gpu%%,*}",
            'echo "mqi: Slurm job $SLURM_JOB_ID on $(hostname): SLURM_JOB_GPUS=${SLURM_JOB_GPUS:-}'
            ' CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"',
            f"{env}sh {WRAPPER_NAME} {gpu_words}",
            "# The job's exit code is the engine's: Slurm's accounting says FAILED when it failed.",
            "code=$(sed -n 's/.*\"exit\": *\\([0-9]*\\).*/\\1/p' exit.json 2>/dev/null)",
            'exit "${code:-1}"',
            "",
        ]
    )


def _line(text: bytes) -> str:
    return text.decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class SlurmAnswer:
    """What Slurm said about one job: where from (squeue, sacct, or unknown), its state and reason."""

    source: str
    state: str
    detail: str  # squeue's reason, or why Slurm could not be asked

    @classmethod
    def parse(cls, line: str) -> SlurmAnswer:
        source, _, rest = line.partition("|")
        state, _, detail = rest.partition("|")
        return cls(source, state.split(" ")[0].strip(), detail.strip())


class SlurmJobs(Backend):
    """Slurm's part, over a transport (this machine, or the login node over SSH) that runs scripts."""

    kind = "slurm"
    gpu_leases = False

    @property
    def slurm(self) -> SlurmSettings:
        return self.settings.slurm

    @property
    def where(self) -> str:
        return f"Slurm via {super().where}"

    @property
    def queue_slots(self) -> bool:  # type: ignore[override]
        """slurm.max_queued_jobs set: each beam holds a place in the capped queue (tasks/gpu/pool.py)."""
        return self.slurm.max_queued_jobs is not None

    @property
    def poll_seconds(self) -> float:
        return self.slurm.poll_seconds

    @property
    def reconnect_seconds(self) -> float:
        return self.slurm.unreachable_seconds

    def _timed(self, command: str) -> str:
        """`command` (a Slurm command line) stopped after slurm.command_timeout_seconds."""
        return f"timeout -k 2 {self.slurm.command_timeout_seconds:g} {command}"

    def _slurm(self, command: str, what: str) -> CommandResult:
        """Run one Slurm command line; ConnectionLost if it does not answer in time."""
        result = self.run(self._timed(command), timeout=self.slurm.command_timeout_seconds + 30)
        if result.code in (124, 137):
            raise ConnectionLost(
                f"{what}: Slurm did not answer within {self.slurm.command_timeout_seconds:g} s on "
                f"{self.where} (is slurmctld running?)"
            )
        return result

    # -- the engine sees its allocated GPU as device 0 ---------------------------
    def engine_argv(self, beam: BeamInput, gpu: int) -> list[str]:
        return super().engine_argv(beam, ALLOCATED_GPU)

    def prepare_launch(self, beam: BeamInput, gpu: int, argv: list[str]) -> LaunchSpec:
        """The transport's moqui_tps.in for GPU 0; the GPU lock lives in the job folder (Slurm allocates)."""
        spec = super().prepare_launch(beam, ALLOCATED_GPU, argv)
        return replace(spec, lock_dir=self.job_dir(beam))

    # -- submission -----------------------------------------------------------------
    def sbatch_words(self, beam: BeamInput) -> list[str]:
        slurm = self.slurm
        words = [
            "sbatch",
            "--parsable",
            f"--job-name={job_name(beam)}",
            # No --chdir: sbatch runs in the job folder, which becomes the job's working folder. Slurm
            # expands % patterns (%j, %u, ...) in the output path joined to that folder's name, unless
            # the path holds a backslash (measured with Slurm 22.05).
            "--output=slurm\\.out",
            f"--gres={slurm.gres}",
            f"--cpus-per-task={slurm.cpus_per_task}",
            f"--time={time_limit_minutes(slurm, self.settings.engine.timeout_seconds)}",
        ]
        for option, value in (
            ("partition", slurm.partition),
            ("account", slurm.account),
            ("qos", slurm.qos),
            ("mem", slurm.memory),
        ):
            if value is not None:
                words.append(f"--{option}={value}")
        return [*words, BATCH_NAME]

    def launch_script(self, beam: BeamInput, job_dir: str, gpu: int, spec: LaunchSpec) -> str:
        """Write the batch script, sbatch it, record and print the job id."""
        q = shlex.quote
        env = "".join(f"{q(f'{name}={value}')} " for name, value in spec.env.items())
        script = batch_script(
            self.slurm.extra_sbatch,
            wrapper_words('"$gpu"', self.settings.engine.timeout_seconds, spec),
            f"env {env}" if env else "",
        )
        sbatch = shlex.join(self.sbatch_words(beam))
        return (
            launch_checks(job_dir, spec, extra_records=SLURM_RECORDS)
            + f"printf '%s' {q(script)} > {BATCH_NAME} && "
            f"id=$({self._timed(sbatch)}) && id=${{id%%;*}} && "
            'printf "%s\\n" "$id" > slurm.id.tmp && mv slurm.id.tmp slurm.id && printf "%s\\n" "$id"'
        )

    def launched(self, job_dir: str, output: bytes) -> Job:
        job_id = _line(output)
        if not job_id.isdigit():
            raise ToolError(f"sbatch answered no job id for {job_dir} on {self.where}: {job_id[:200]!r}")
        return Job(job_dir, JobState.RUNNING, queued=Queued(job_id, since=time.time()))

    # -- the job's state: Slurm's answer, then its folder ------------------------
    def probe_script(self, job_dir: str, log_offset: int | None, wait: float) -> str:
        """Print the job id (or `none`), Slurm's answer, then the job folder (base.probe_script).

        With `wait`, first watch the folder for up to that long for the job's next step
        (its record appears, the engine exits, the job ends). Slurm is asked before the
        folder is read: a job Slurm calls ended has written all it ever will.
        """
        steps = max(1, round(wait / 0.05)) if wait > 0 else 0
        watch = (
            "{ [ -f job.json ] && { [ -f engine.ended ] && next=exit.json || next=engine.ended; } "
            "|| next=job.json; }; "
            f'i=0; while [ $i -lt {steps} ] && [ ! -f exit.json ] && [ ! -f "$next" ]; '
            "do sleep 0.05; i=$((i + 1)); done; "
            if steps
            else ""
        )
        squeue = self._timed('squeue -h -t all -j "$id" -o "%T|%r"')
        sacct = self._timed('sacct -n -P -X -j "$id" -o State')
        jobcomp = self._timed('sacct -c -n -P -j "$id" -o State')
        return (
            f"cd -- {shlex.quote(job_dir)} 2>/dev/null && [ -f slurm.id ] && read -r id _ < slurm.id "
            "|| { echo none; exit 0; }; "
            'echo "$id"; ' + watch + f"q=$({squeue} 2>&1); c=$?; "
            'if [ $c -eq 0 ] && [ -n "$q" ]; then echo "squeue|$(echo "$q" | head -n 1)"; '
            f"else a=$({{ {sacct} 2>/dev/null || {jobcomp} 2>/dev/null; }} | head -n 1); "
            'if [ -n "$a" ]; then echo "sacct|$a|"; '
            f'else echo "{UNKNOWN}|$c|$(echo "$q" | head -n 1)"; fi; fi; ' + probe_script(".", log_offset)
        )

    def probe(self, job: Job, log_offset: int | None = None, wait: float = 0.0) -> tuple[Job, bytes]:
        result = self._checked(
            self.probe_script(job.dir, log_offset, wait),
            f"reading job {job.dir}",
            timeout=wait + 3 * self.slurm.command_timeout_seconds + 30,
        )
        head, _, rest = result.stdout.partition(b"\n")
        job_id = _line(head)
        if job_id == "none":  # never submitted (or a record from before Slurm): launch
            return Job(job.dir, JobState.MISSING), b""
        answer_line, _, folder = rest.partition(b"\n")
        answer = SlurmAnswer.parse(_line(answer_line))
        found, log = parse_probe(job.dir, folder)
        return self._judge(job, job_id, answer, found), log

    def _judge(self, before: Job, job_id: str, answer: SlurmAnswer, found: Job) -> Job:
        """The job as Slurm and its folder tell it together."""
        seen = before.queued if before.queued and before.queued.job_id == job_id else Queued(job_id)
        if found.state is JobState.MISSING and found.pid is not None:  # collected: a later run is a new job
            return found
        rejected = (
            found.state is JobState.FINISHED_FAILED and found.exit_code is None and found.problem != LOST
        )
        if found.exit_code is not None or rejected:  # its exit record decides, as on every backend
            # The batch script exits with the engine's code: Slurm ends it COMPLETED or FAILED.
            state = answer.state if answer.state in SLURM_ENDS else "FAILED" if found.exit_code else ""
            if found.exit_code:
                problem = f"Slurm job {job_id} {state}"
                found = replace(found, problem=f"{found.problem}; {problem}" if found.problem else problem)
            return replace(found, queued=replace(seen, state=state, reason=""))
        if answer.source == UNKNOWN:
            if "Invalid job id" not in answer.detail:
                raise ConnectionLost(
                    f"Slurm did not say how job {job_id} is (squeue exit {answer.state}: "
                    f"{answer.detail or 'no answer'}; is slurmctld running?)"
                )
            problem = f"Slurm no longer knows job {job_id} and it left no exit record"
            return replace(
                found, state=JobState.FINISHED_FAILED, problem=problem, queued=replace(seen, state="")
            )
        if answer.state in ACTIVE:
            reason = answer.detail if answer.detail not in ("", "None") else ""
            queued = replace(seen, state=answer.state, reason=reason)
            running = found if found.pid is not None else Job(before.dir, JobState.RUNNING)
            return replace(running, state=JobState.RUNNING, problem=None, queued=queued)
        retry = answer.state in self.slurm.retry_states or answer.state not in SLURM_ENDS
        problem = f"Slurm job {job_id} ended {answer.state} without an exit record" + (
            "" if retry else " (not retried: slurm.retry_states)"
        )
        if answer.state == "TIMEOUT":
            minutes = time_limit_minutes(self.slurm, self.settings.engine.timeout_seconds)
            problem += f"; its time limit is {minutes} min"
        queued = replace(seen, state=answer.state, reason="", retry=retry)
        return replace(found, state=JobState.FINISHED_FAILED, problem=problem, queued=queued)

    def left_queue(self, job: Job) -> bool:
        """Ask squeue until the job is no longer queued, running or completing (at most
        slurm.command_timeout_seconds): its exit record comes a moment before Slurm ends it."""
        if job.queued is None or job.queued.state in SLURM_ENDS:
            return job.queued is not None
        deadline = time.monotonic() + self.slurm.command_timeout_seconds
        squeue = f"squeue -h -t all -j {shlex.quote(job.queued.job_id)} -o %T"
        while True:
            try:
                result = self._slurm(squeue, f"asking Slurm whether job {job.queued.job_id} has ended")
            except ConnectionLost:
                return True  # it has ended all the same: its exit record is there
            state = _line(result.stdout).split(" ")[0]
            if result.code != 0 or state not in ACTIVE or time.monotonic() >= deadline:
                return True
            time.sleep(LEFT_QUEUE_POLL_SECONDS)  # slurmd tells slurmctld within a fraction of a second

    # -- what the beam's log says -------------------------------------------------
    def waiting(self, job: Job) -> str | None:
        queued = job.queued
        if queued is None or not queued.pending:
            return None
        return f"Slurm job {queued.job_id} pending: {queued.reason or 'queued'}"

    def describe(self, job: Job) -> str:
        if job.queued is None:
            return super().describe(job)
        queued = job.queued
        if job.pid is not None:
            return f"as Slurm job {queued.job_id} on {job.host}, GPU {job.gpu} ({job.dir})"
        state = f"{queued.state or 'submitted'}{': ' + queued.reason if queued.reason else ''}"
        return f"as Slurm job {queued.job_id} ({state}; {job.dir})"

    def news(self, before: Job, after: Job) -> str | None:
        """`pending: Resources` when a job waits (or waits for another reason), where it started."""
        was, now = before.queued, after.queued
        if now is None:
            return None
        if now.pending and (was is None or not was.pending or was.reason != now.reason):
            return self.waiting(after)
        if after.pid is not None and before.pid is None and after.state is JobState.RUNNING:
            waited = (
                f" after {after.started - now.since:.1f} s in the queue"
                if after.started and now.since
                else ""
            )
            return (
                f"Slurm job {now.job_id} started on {after.host}{waited}: physical GPU {after.gpu} "
                f"(SLURM_JOB_GPUS), the engine's GPUID {ALLOCATED_GPU}"
            )
        return None

    # -- cancel -----------------------------------------------------------------------
    def stop(self, job: Job, reason: str = "") -> bool:
        """scancel the job of this record (a cancelled case run: its beams' jobs go with it)."""
        if job.queued is None:
            return False
        result = self._slurm(
            f"scancel {shlex.quote(job.queued.job_id)}", f"cancelling Slurm job {job.queued.job_id}"
        )
        if result.code != 0:
            raise ToolError(f"scancel {job.queued.job_id} failed on {self.where}: {result.output()}")
        return True

    def stop_case(self, case_id: str) -> list[str]:
        """scancel every job of the case Slurm still queues or runs; return their ids."""
        listed = self._checked(
            f"for d in {self.case_jobs_pattern(case_id)}; do "
            '[ -f "$d/slurm.id" ] && [ ! -f "$d/exit.json" ] && read -r id _ < "$d/slurm.id" && echo "$id"; '
            "done; true",
            f"listing the Slurm jobs of case {case_id}",
        )
        ids = [word for word in listed.stdout.decode().split() if word.isdigit()]
        if not ids:
            return []
        queued = self._slurm(f"squeue -h -o %i -j {','.join(ids)}", f"listing the jobs of case {case_id}")
        active = [word for word in queued.stdout.decode().split() if word in ids]
        for job_id in active:
            self.stop(Job("", JobState.RUNNING, queued=Queued(job_id)))
        return active


class SlurmLocalBackend(SlurmJobs, LocalBackend):
    """Slurm commands run here: the orchestrator is on a login node sharing the job folders' file system."""


class SlurmSshBackend(SlurmJobs, SshBackend):
    """Slurm commands run on the login node of the ssh: section; job folders under ssh.remote_root."""


@dataclass(frozen=True)
class SlurmNode:
    name: str
    partition: str
    state: str
    gres: str  # e.g. gpu:4
    gres_used: str  # e.g. gpu:2(IDX:0-1)


@dataclass(frozen=True)
class SlurmGpuJob:
    job_id: str
    name: str
    user: str
    state: str
    nodes: str
    gres: str
    elapsed: str
    reason: str


@dataclass(frozen=True)
class SlurmReport:
    """`mqi gpus` under Slurm: the partition's nodes and GPUs, and the jobs holding or awaiting them."""

    where: str
    nodes: list[SlurmNode]
    jobs: list[SlurmGpuJob]


def _rows(result: CommandResult, what: str, fields: int) -> list[list[str]]:
    if result.code != 0:
        raise ToolError(f"{what} failed (exit {result.code}): {result.output()}")
    rows = [line.split("|") for line in result.stdout.decode("utf-8", "replace").splitlines() if line]
    return [row[:fields] for row in rows if len(row) >= fields]


def slurm_report(backend: SlurmJobs) -> SlurmReport:
    """sinfo and squeue (every call under its timeout) for slurm.partition, or every partition."""
    partition = backend.slurm.partition
    where = f"-p {shlex.quote(partition)} " if partition else ""
    sinfo = backend._slurm(
        f"sinfo -h -N {where}-O NodeHost:'|',Partition:'|',StateLong:'|',Gres:'|',GresUsed:'|'",
        "asking sinfo for the GPU nodes",
    )
    squeue = backend._slurm(
        f"squeue -h -t RUNNING,PENDING {where}-o '%i|%j|%u|%T|%N|%b|%M|%r'", "asking squeue for the GPU jobs"
    )
    nodes = [SlurmNode(*row) for row in _rows(sinfo, f"sinfo on {backend.where}", 5)]
    jobs = [SlurmGpuJob(*row) for row in _rows(squeue, f"squeue on {backend.where}", 8) if "gpu" in row[5]]
    label = f"partition {partition}" if partition else "every partition"
    return SlurmReport(where=f"{label} of {backend.where}", nodes=nodes, jobs=jobs)
