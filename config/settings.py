"""Typed settings for MQI Communicator, validated when the program starts.

The old orchestrator dropped unknown YAML keys silently, so a typo switched a
setting off without a word. Here every model forbids extra keys, every value
is typed, every `{placeholder}` in a path or command is checked against the
names that field may use, and each error names the key and the file.
"""

from __future__ import annotations

import math
import re
import socket
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from config.profiles import EngineProfile, shipped_profiles

# The single source of these defaults and allowed values (discovery, the engine input and
# the stand-ins import them from here).
DEFAULT_READY_MARKER = "_CASE_READY"
DeliveryPolicy = Literal["earliest_complete", "latest_complete", "single"]
DELIVERY_POLICIES: tuple[str, ...] = get_args(DeliveryPolicy)
DEFAULT_DELIVERY_POLICY: DeliveryPolicy = "earliest_complete"
OutputFormat = Literal["raw", "dcm", "mhd", "mha", "npz"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)


class Strict(BaseModel):
    # No infinity or NaN anywhere: `.inf` for a timeout or a lease passed the check and then
    # failed every beam with an unclear error.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _plain_file_name(value: str) -> str:
    """A single name in a folder: what the sensor and the flow join to a case or scan folder."""
    if (
        value in ("", ".", "..")
        or "/" in value
        or "\\" in value
        or any(ord(char) < 32 or ord(char) == 127 for char in value)
    ):
        raise ValueError(f"{value!r} is not a plain file name (no path separators, not '.' or '..')")
    return value


PlainFileName = Annotated[str, AfterValidator(_plain_file_name)]


def placeholders(template: str) -> set[str]:
    """The `{name}` fields a template uses."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}


def require_placeholders(argv: list[str], allowed: set[str], required: set[str]) -> list[str]:
    """Check every part of a command template; the tool cannot work without the `required` ones."""
    used: set[str] = set()
    for part in argv:
        check_placeholders(part, allowed)
        used |= placeholders(part)
    for name in sorted(required - used):
        raise ValueError(f"the command must pass {{{name}}} to the tool")
    return argv


def check_placeholders(template: str, allowed: set[str]) -> str:
    """`template` uses only `allowed` names, each plainly: `{name}`, no format spec, no conversion."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)]
    except ValueError as bad:
        raise ValueError(f"{template!r} is not a valid template: {bad}") from None
    for name, spec, conversion in fields:
        if spec or conversion:
            raise ValueError(
                f"{template!r}: placeholder {{{name}}} has a format spec or conversion "
                f"({'!' + conversion if conversion else ''}{':' + spec if spec else ''}); write {{{name}}}"
            )
    used = {name for name, _, _ in fields if name is not None}
    unknown = used - allowed
    if "" in used or unknown:
        names = ", ".join(sorted("{" + n + "}" for n in unknown | ({""} & used)))
        raise ValueError(
            f"{template!r} uses unknown placeholder(s) {names}; "
            f"allowed here: {', '.join(sorted('{' + a + '}' for a in allowed))}"
        )
    return template


# Which placeholders each templated setting may use.
PATH_FIELDS = {"data_root"}
CASE_PATH_FIELDS = {"data_root", "case_id"}
INTERPRETER_FIELDS = {"python", "case_dir", "csv_dir", "case_id"}
ENGINE_FIELDS = {"python", "input", "case_id", "beam_number", "gpu"}


class PathSettings(Strict):
    """Where cases come from and where their work and results go."""

    scan_dir: str = Field("{data_root}/scan", description="Folder watched for case folders.")
    work_dir: str = Field(
        "{data_root}/work/{case_id}",
        description="Per-case scratch: interpreter CSVs, moqui_tps.in files, raw dose.",
    )
    output_dir: str = Field(
        "{data_root}/output/{case_id}", description="Per-case RTDOSE files and provenance."
    )
    results_dir: str = Field(
        "{data_root}/results",
        description="Stored results of finished beam simulations (what reruns reuse) and Prefect's "
        "result storage; on a path every worker machine shares when workers span machines.",
    )

    @field_validator("scan_dir", "results_dir")
    @classmethod
    def _scan(cls, value: str) -> str:
        return check_placeholders(value, PATH_FIELDS)

    @field_validator("work_dir", "output_dir")
    @classmethod
    def _per_case(cls, value: str) -> str:
        check_placeholders(value, CASE_PATH_FIELDS)
        if "{case_id}" not in value:
            raise ValueError(f"{value!r} must contain {{case_id}} so cases never share a folder")
        return value


class CaseSettings(Strict):
    """What makes a case folder complete, and which delivery of a beam is recalculated."""

    ready_marker: PlainFileName = Field(
        DEFAULT_READY_MARKER,
        description="File the transfer service writes into a case folder when it is complete.",
    )
    delivery_policy: DeliveryPolicy = Field(
        DEFAULT_DELIVERY_POLICY,
        description="Which delivery folder of a beam with several (fractions) is recalculated: "
        "earliest_complete, latest_complete, or single (several are an error).",
    )


class InterpreterSettings(Strict):
    """The clinic's interpreter (plan + delivery logs -> per-layer CSVs), run once per case."""

    command: list[str] = Field(
        default=[
            "{python}",
            "-m",
            "standins.interpreter",
            "--logdir",
            "{case_dir}",
            "--outputdir",
            "{csv_dir}",
        ],
        min_length=1,
        description="argv of mqi_interpreter; the real one is "
        "[python, /path/main_cli.py, --logdir, {case_dir}, --outputdir, {csv_dir}].",
    )
    workdir: str | None = Field(None, description="cwd for the interpreter (default: the case's work dir).")
    timeout_seconds: float = Field(
        1800, gt=0, description="The interpreter is killed (and the case fails) after this many seconds."
    )

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        return require_placeholders(value, INTERPRETER_FIELDS, {"case_dir", "csv_dir"})


class EngineSettings(Strict):
    """The MOQUI engine (tps_env): how it is started, watched, judged and retried."""

    command: list[str] = Field(
        default=["{python}", "-m", "standins.tps_env", "{input}"],
        min_length=1,
        description="argv of MOQUI tps_env; the real one is [/path/tps_env, {input}].",
    )
    workdir: str = Field("{data_root}/engine", description="The engine's directory; it runs with this cwd.")
    timeout_seconds: float = Field(7200, gt=0, description="A beam's engine run is killed after this.")
    poll_seconds: float = Field(0.5, gt=0, le=60, description="How often the engine log is read.")
    retries: int = Field(2, ge=0, le=10, description="Extra attempts for transient engine faults.")
    retry_delay_seconds: list[Annotated[float, Field(ge=0)]] = Field(
        default=[2, 10],
        min_length=1,
        description="Pause before each retry of a beam (the last value repeats for later retries).",
    )
    profile: str = Field(
        "moqui-smc-public",
        min_length=1,
        description="The engine build's profile: what it reads from moqui_tps.in and prints "
        "(moqui-smc-public, moqui-smc-clinic, or one under engine_profiles:).",
    )

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        return require_placeholders(value, ENGINE_FIELDS, {"input"})

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        return check_placeholders(value, PATH_FIELDS)


class PhantomSettings(Strict):
    """The water phantom the dose is scored in (UsingPhantomGeo)."""

    dims: tuple[int, int, int] = Field((100, 100, 100), description="Voxels in x, y, z.")
    unit_mm: tuple[float, float, float] = Field((2.0, 2.0, 2.0), description="Voxel size (mm).")
    position_mm: tuple[float, float, float] | None = Field(
        None,
        description="Outer corner of the first voxel (mm, in the engine's beam-aligned phantom frame: "
        "the beam axis is x = y = 0 and the beam travels -z); default: centred on the beam axis with "
        "the beam entering its top face at z = 0.",
    )

    @field_validator("dims")
    @classmethod
    def _dims(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) <= 0:
            raise ValueError("every phantom dimension must be positive")
        return value

    @field_validator("unit_mm")
    @classmethod
    def _unit(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("every voxel size must be positive")
        return value


class TpsSettings(Strict):
    """Engine options written to every moqui_tps.in (typed; MOQUI ignores unknown keys)."""

    random_seed: int = Field(-1932780356, description="RandomSeed: the engine's random number seed.")
    particles_per_history: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Written as the profile's histories key (ParticlesPerHistory): the public build "
        "runs int(count x this) histories per spot record, so it sets the run time and the statistical "
        "noise; records with count x this < 1 are not simulated at all. See dose.gy_per_unit.",
    )
    total_threads: int = Field(-1, description="TotalThreads: -1 lets the engine choose.")
    max_histories_per_batch: int = Field(
        10000, gt=0, description="MaxHistoriesPerBatch: proton histories simulated per batch."
    )
    verbosity: int = Field(0, ge=0, description="Verbosity of the engine's log (0: least).")
    using_phantom_geo: bool = Field(
        True, description="UsingPhantomGeo: score in the water phantom below, not on the CT."
    )
    two_centimeter_mode: bool = Field(
        False, description="TwoCentimeterMode: the engine scores one plane at 2 cm depth."
    )
    phantom: PhantomSettings = Field(
        PhantomSettings(),
        description="The water phantom's grid (PhantomDim*, PhantomUnit*, PhantomPosition*).",
    )
    scorer: str = Field("Dose", pattern=r"^[A-Za-z0-9]+$", description="Scorer: the quantity scored.")
    supress_std: bool = Field(True, description="SupressStd: no statistical uncertainty output.")
    read_structure: bool = Field(False, description="ReadStructure: read an RT structure set.")
    body_contour_name: str = Field("BODY", description="BodyContourName: the body ROI, with ReadStructure.")
    source_type: Literal["FluenceMap"] = Field(
        "FluenceMap", description="SourceType: spots from the delivery logs' fluence."
    )
    simulation_type: Literal["perBeam"] = Field("perBeam", description="SimulationType: one run per beam.")
    score_to_ct_grid: bool = Field(False, description="ScoreToCTGrid: score on the CT grid, not the phantom.")
    output_format: OutputFormat = Field(
        "raw", description="OutputFormat of the dose: raw (converted here to RTDOSE) or dcm (collected)."
    )
    overwrite_results: bool = Field(True, description="OverwriteResults: replace an existing dose file.")


class BackendSettings(Strict):
    """Where the engines run, and the GPUs they may use there."""

    kind: Literal["local", "ssh", "slurm"] = Field(
        "local",
        description="Where engines run: this machine, the GPU host of the ssh: section, or Slurm jobs "
        "(slurm: section; over SSH when there is an ssh: section).",
    )
    host: str = Field(
        "local",
        pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
        description="GPU host name, used in the GPU limit names gpu-<host>-<index>.",
    )
    gpus: list[int] = Field(default=[0, 1, 2], min_length=1, description="GPU indices to use.")
    gpu_lease_seconds: float = Field(
        120, ge=60, description="A dead holder's GPU is freed about this long after it died."
    )
    nvidia_smi: list[str] = Field(
        default=["nvidia-smi"],
        min_length=1,
        description="argv of nvidia-smi on the GPU host (`mqi gpus`); the queries are appended.",
    )
    min_free_memory_mib: int = Field(
        0,
        ge=0,
        description="A free-lease GPU with less free memory than this (per nvidia-smi) is passed over.",
    )

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("GPU indices must be distinct and >= 0")
        return value


REMOTE_ENGINE_FIELDS = {"input", "case_id", "beam_number", "gpu"}
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def absolute_posix(value: str) -> str:
    if not value.startswith("/") or any(c in value for c in "\0\n\r"):
        raise ValueError(f"{value!r} must be an absolute path on the GPU host")
    return value


class SshSettings(Strict):
    """The GPU host reached over SSH (backend.kind: ssh). Names of secrets only, never secrets."""

    host: str = Field(pattern=r"^[A-Za-z0-9._:-]+$", description="Host name or address of the GPU node.")
    port: int = Field(22, ge=1, le=65535, description="SSH port of the GPU node.")
    user: str = Field(
        pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]*$", description="User the jobs run as on the GPU node."
    )
    key_file: str | None = Field(
        None, description="Private key file; relative paths resolve beside the config file."
    )
    key_passphrase_env: str | None = Field(
        None, pattern=ENV_NAME, description="Name of the environment variable holding the key's passphrase."
    )
    key_passphrase_secret_block: str | None = Field(
        None, min_length=1, description="Name of the Prefect Secret block holding the key's passphrase."
    )
    allow_agent: bool = Field(True, description="Also offer the keys of a running ssh-agent (SSH_AUTH_SOCK).")
    known_hosts: str = Field(
        "~/.ssh/known_hosts",
        description="The host's key must be in this file; unknown or changed keys are refused.",
    )
    remote_root: str = Field(
        description="Job folders on the host: <remote_root>/<case id>/beam-NN/<input hash>/."
    )
    engine_dir: str = Field(description="The engine's directory on the host; it runs with this cwd.")
    engine_command: list[str] = Field(
        min_length=1, description="argv of tps_env on the host, e.g. [/opt/moqui/tps_env, '{input}']."
    )
    forward_env: list[str] = Field(
        default=[], description="Environment variables passed from here to the engine (e.g. CUDA settings)."
    )
    poll_seconds: float = Field(
        3, gt=0, le=60, description="How often a running job's log and exit are read."
    )
    connect_timeout_seconds: float = Field(20, gt=0, description="TCP connect, banner, key exchange, auth.")
    command_timeout_seconds: float = Field(
        60, gt=0, description="Longest silence allowed on any SSH channel or SFTP operation."
    )
    keepalive_seconds: float = Field(15, ge=0, description="SSH keepalive interval; 0 disables.")
    reconnect_seconds: float = Field(
        900, ge=0, description="How long following a job keeps reconnecting after the connection is lost."
    )
    max_sessions: int = Field(
        8, ge=1, le=64, description="Channels open at once on the one connection (sshd's MaxSessions is 10)."
    )
    compression: Literal["auto", "zstd", "none"] = Field(
        "auto", description="Compress dose with zstd on the host before download; auto: if zstd is there."
    )
    cleanup: Literal["keep", "delete_on_success"] = Field(
        "delete_on_success", description="Remove a beam's job folder on the host after a verified download."
    )

    @field_validator("remote_root", "engine_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return absolute_posix(value)

    @field_validator("engine_command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        return require_placeholders(value, REMOTE_ENGINE_FIELDS, {"input"})

    @field_validator("forward_env")
    @classmethod
    def _env_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(ENV_NAME, name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @field_validator("key_file")
    @classmethod
    def _key_is_a_path(cls, value: str | None) -> str | None:
        if value is not None and ("PRIVATE KEY" in value or "\n" in value):
            raise ValueError("must be the path of a key file; a key never belongs in the config")
        return value

    @model_validator(mode="after")
    def _one_passphrase_source(self) -> SshSettings:
        if self.key_passphrase_env and self.key_passphrase_secret_block:
            raise ValueError("set key_passphrase_env or key_passphrase_secret_block, not both")
        return self


SLURM_STATES = Literal[
    "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"
]
SLURM_NAME = r"^[A-Za-z0-9_.+-]+$"


class SlurmSettings(Strict):
    """Beams as Slurm batch jobs (backend.kind: slurm): Slurm allocates the GPUs, no GPU lease is taken."""

    partition: str | None = Field(
        None, pattern=SLURM_NAME, description="sbatch --partition (default: Slurm's)."
    )
    account: str | None = Field(None, pattern=SLURM_NAME, description="sbatch --account.")
    qos: str | None = Field(None, pattern=SLURM_NAME, description="sbatch --qos.")
    gres: str = Field(
        "gpu:1", pattern=r"^gpu(:[A-Za-z0-9_.-]+)?:1$", description="sbatch --gres: one GPU per beam."
    )
    cpus_per_task: int = Field(1, ge=1, le=256, description="sbatch --cpus-per-task.")
    memory: str | None = Field(
        None, pattern=r"^[0-9]+[KMGT]?$", description="sbatch --mem (e.g. 16G; default: the partition's)."
    )
    time_limit_minutes: int | None = Field(
        None,
        ge=1,
        description="sbatch --time in minutes; default: engine.timeout_seconds plus 5 minutes, rounded up.",
    )
    extra_sbatch: list[str] = Field(
        default=[],
        description="More `#SBATCH` lines for the batch script, without the `#SBATCH` (e.g. --exclusive).",
    )
    retry_states: list[SLURM_STATES] = Field(
        default=["NODE_FAIL", "PREEMPTED", "BOOT_FAIL"],
        description="Slurm end states of a job that never wrote its exit record that are retried; the "
        "others fail the beam at once. A job whose engine exited is judged by its exit code and log, as on "
        "every backend.",
    )
    max_queued_jobs: int | None = Field(
        None,
        ge=1,
        description="At most this many of this deployment's jobs in Slurm's queue (pending or running) at "
        "once: a Prefect global concurrency limit slurm-queue-<login host, or local>, a place held by each "
        "beam from before sbatch until its job has ended. Default none: no cap (Slurm queues them all).",
    )
    poll_seconds: float = Field(2, gt=0, le=60, description="How often a job's state, log and exit are read.")
    command_timeout_seconds: float = Field(
        20,
        gt=0,
        description="Longest any sbatch/squeue/sacct/scancel/sinfo call may take (they hang while "
        "slurmctld is down).",
    )
    unreachable_seconds: float = Field(
        900, ge=0, description="How long following a job keeps asking while slurmctld does not answer."
    )

    @field_validator("extra_sbatch")
    @classmethod
    def _one_line_each(cls, value: list[str]) -> list[str]:
        for line in value:
            if not line.strip() or any(c in line for c in "\0\n\r"):
                raise ValueError(f"{line!r} must be one non-empty line")
        return value


class DicomSettings(Strict):
    """The RTDOSE files written."""

    dose_type: Literal["PHYSICAL", "EFFECTIVE"] = Field(
        "PHYSICAL", description="DoseType of every RTDOSE: PHYSICAL, or EFFECTIVE (RBE-weighted)."
    )
    validator: str | None = Field(
        "dciodvfy",
        description="DICOM validator run on every RTDOSE written (skipped with a warning "
        "if not installed); null to disable.",
    )


class DoseSettings(Strict):
    """The dose scale of the RTDOSE files, and what a dose must look like to be accepted."""

    gy_per_unit: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Calibration: RTDOSE Gy = engine raw value x this x particles_per_history ^ the "
        "profile's raw_dose_pph_power. Commissioned per machine and engine build (README).",
    )
    plausible_max_gy: tuple[float, float] = Field(
        (1e-3, 1e3),
        description="A beam whose maximum dose (Gy, after calibration) is outside [low, high] fails as "
        "bad output; so does one that is all zero or holds NaN or infinity.",
    )

    @field_validator("plausible_max_gy")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (0 < low < high < float("inf")):
            raise ValueError("needs 0 < low < high, both finite")
        return value


class QaSettings(Strict):
    """Patient-specific QA: each beam's recalculated dose against its reference (TPS dose or measurement)."""

    enabled: bool = Field(True, description="Compare every beam that has a reference; false skips QA.")
    dose_percent: float = Field(
        2.0, gt=0, le=20, description="Gamma dose criterion, % (of the reference maximum when global)."
    )
    distance_mm: float = Field(2.0, gt=0, le=20, description="Gamma distance-to-agreement criterion, mm.")
    low_dose_cutoff_percent: float = Field(
        5.0,
        ge=0,
        lt=100,
        description="Reference points below this % of the reference maximum are not evaluated.",
    )
    normalisation: Literal["global", "local"] = Field(
        "global",
        description="global: the dose criterion is a % of the reference maximum; local: of each "
        "point's dose.",
    )
    action_level_percent: float = Field(
        95.0, gt=0, le=100, description="A beam passes when at least this % of its evaluated points pass."
    )
    reference_dir: str | None = Field(
        None,
        description="A folder of references besides the case folder ({data_root}, {case_id} allowed); "
        "TPS RTDOSE files and OCTAVIUS .mcc files are looked for there and in the case folder.",
    )
    measurement_depth_mm: float = Field(
        20.0,
        gt=0,
        description="Depth in water of an .mcc measurement plane (the clinic's plane QA: 20 mm); a 3-D "
        "recalculated dose is compared at this depth.",
    )
    search_steps: int = Field(
        10,
        ge=2,
        le=100,
        description="Gamma search steps per distance criterion (pymedphys interp_fraction): 10 searches "
        "every 0.2 mm at 2 mm; points found just above 1 (up to 1.2) are searched again in 30 steps "
        "(benchmarks/gamma.py: with that, 10 agrees with a brute-force search).",
    )
    rbe: float = Field(
        1.1,
        gt=0,
        le=2,
        description="A reference of DoseType EFFECTIVE (RBE-weighted, as RayStation exports) is divided by "
        "this before it is compared with the physical recalculated dose.",
    )

    @field_validator("reference_dir")
    @classmethod
    def _reference_dir(cls, value: str | None) -> str | None:
        return None if value is None else check_placeholders(value, CASE_PATH_FIELDS)


class SensorSettings(Strict):
    """The file sensor: when a case folder in the scan folder becomes a case run, and how many run."""

    poll_seconds: float = Field(
        0.5, gt=0, le=60, description="How often the scan folder is checked for new or changed cases."
    )
    rescan_seconds: float = Field(
        300,
        gt=0,
        description="How often every case's file list is read again (files rewritten in place "
        "do not change a folder's timestamp, so only this finds them).",
    )
    quiet_seconds: float | None = Field(
        None,
        gt=0,
        description="null: a case is ready only with the ready marker; a number: also once no file "
        "has changed for this long (sources that write no marker).",
    )
    settle_seconds: float = Field(
        1.0,
        ge=0,
        description="A case runs only once none of its files has changed for this long, marker or "
        "not: a transfer that writes the marker early must not start a run on growing files.",
    )
    incomplete_report_seconds: float = Field(
        600,
        ge=0,
        description="A ready case with fewer delivery folders than treatment beams, or whose files "
        "keep changing, waits; after settle_seconds + this long it is reported (log and an "
        "mqi.case.incomplete event).",
    )
    room_folders: list[PlainFileName] = Field(
        default=["G1", "G2"],
        description="Subfolders of the scan folder that hold the cases of one gantry room (scan/G2/<case>).",
    )
    max_running_cases: int | None = Field(
        None,
        ge=1,
        description="Case runs at a time under `mqi up`; the others wait in the queue. null: two per "
        "GPU, so that while one case of a GPU prepares or converts, another has a beam ready for it.",
    )
    case_deployment: str = Field(
        "process-case/case",
        pattern=r"^[^/]+/[^/]+$",
        description="The deployment that runs a case: '<flow name>/<deployment name>' (prefect.yaml).",
    )


class NotifySettings(Strict):
    """Who is told when a case fails: a Prefect automation that `mqi up` creates from these."""

    blocks: list[str] = Field(
        default=[],
        description="Prefect notification blocks, as '<block type slug>/<block name>' (e.g. "
        "'slack-webhook/physics', 'email/physics'), each told when a case run fails. Create them on the "
        "UI's Blocks page: they hold the webhook URL or mail credentials, which never belong here.",
    )
    webhook_urls: list[str] = Field(
        default=[],
        description='URLs sent a JSON POST ({"subject", "body"}) when a case run fails; `mqi up` '
        "keeps each in a custom-webhook block. A URL holding a token comes from the environment: ${VAR}.",
    )

    @field_validator("blocks")
    @classmethod
    def _slug_and_name(cls, value: list[str]) -> list[str]:
        for block in value:
            if block.count("/") != 1 or not all(block.split("/")):
                raise ValueError(f"{block!r} is not '<block type slug>/<block name>'")
        return value

    @field_validator("webhook_urls")
    @classmethod
    def _http(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return value


UNECHOED_KEYS = {"server.database"}  # a wrong value may hold a password: errors do not repeat it
SharedPath = Literal["scan_dir", "output_dir", "results_dir"]
POSTGRES_URL = re.compile(
    r"^postgresql\+asyncpg://(?P<user>[^:@/\s]+)(?P<password>:[^@/\s]*)?@(?P<host>[^:@/\s]+)(:\d+)?/[^/\s?]+$"
)


class ServerSettings(Strict):
    """The Prefect server: its database, and what the machines that share it must agree on."""

    database: str = Field(
        "sqlite",
        description="The server's database: 'sqlite' (a file under the data root's prefect/ folder, one "
        "machine) or postgresql+asyncpg://USER@HOST:PORT/DB (several machines; no password here: "
        "see password_env).",
    )
    password_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the PostgreSQL user's password (null: none, e.g. "
        "trust or peer authentication); the password is never read from this file.",
    )
    machine: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="This machine's name among the workers of one server (its worker is mqi-<machine>); "
        "null: the host name.",
    )
    shared_paths: list[SharedPath] = Field(
        default=["scan_dir", "output_dir", "results_dir"],
        description="Paths every machine must see at the same place (a case run may run on any "
        "worker); `mqi up` records them on the server and a worker whose paths differ refuses to start.",
    )

    @field_validator("database")
    @classmethod
    def _database(cls, value: str) -> str:
        if value == "sqlite":
            return value
        match = POSTGRES_URL.match(value)
        if match is None:
            raise ValueError("neither 'sqlite' nor postgresql+asyncpg://USER@HOST[:PORT]/DB")
        if match["password"]:
            raise ValueError("the URL holds a password; name its environment variable in server.password_env")
        return value

    @property
    def postgres(self) -> bool:
        return self.database != "sqlite"


class Settings(Strict):
    """Everything MQI Communicator is told: one file, validated at start-up."""

    data_root: str = Field(
        "../data",
        description="Folder under which scan, work, output, results and logs live by default; "
        "relative paths resolve against the config file's folder.",
    )
    paths: PathSettings = Field(PathSettings(), description="Where cases come from and where results go.")
    case: CaseSettings = Field(CaseSettings(), description="What makes a case folder complete.")
    interpreter: InterpreterSettings = Field(InterpreterSettings(), description="The clinic's interpreter.")
    engine: EngineSettings = Field(EngineSettings(), description="The MOQUI engine.")
    tps: TpsSettings = Field(TpsSettings(), description="Options written to every moqui_tps.in.")
    backend: BackendSettings = Field(BackendSettings(), description="Where engines run, on which GPUs.")
    ssh: SshSettings | None = Field(
        None,
        description="The GPU node over SSH (backend.kind: ssh), or Slurm's login node (backend.kind: slurm).",
    )
    slurm: SlurmSettings = Field(SlurmSettings(), description="Slurm batch jobs (backend.kind: slurm).")
    dicom: DicomSettings = Field(DicomSettings(), description="The RTDOSE files written.")
    dose: DoseSettings = Field(DoseSettings(), description="The dose scale and what an acceptable dose is.")
    engine_profiles: dict[str, EngineProfile] = Field(
        default={},
        description="Profiles of engine builds besides the shipped ones (config/engine_profiles.yaml), "
        "by name; engine.profile may name one.",
    )
    sensor: SensorSettings = Field(SensorSettings(), description="The file sensor and how many cases run.")
    notify: NotifySettings = Field(NotifySettings(), description="Who is told when a case fails.")
    qa: QaSettings = Field(
        QaSettings(), description="Patient-specific QA: gamma against each beam's reference."
    )
    server: ServerSettings = Field(
        ServerSettings(), description="The Prefect server's database and the machines that share it."
    )
    _source: Path | None = PrivateAttr(None)  # the config file; relative paths resolve beside it

    @model_validator(mode="after")
    def _root_is_concrete(self) -> Settings:
        if placeholders(self.data_root):
            raise ValueError("data_root cannot contain placeholders")
        return self

    @model_validator(mode="after")
    def _profile_fits(self) -> Settings:
        shipped = shipped_profiles()
        for name in self.engine_profiles:
            if name in shipped:
                raise ValueError(f"engine_profiles.{name}: a shipped profile has that name; choose another")
        known = {**shipped, **self.engine_profiles}
        if self.engine.profile not in known:
            raise ValueError(
                f"engine.profile {self.engine.profile!r} is not a known profile ({', '.join(sorted(known))})"
            )
        profile = known[self.engine.profile]
        phantom = self.tps.phantom
        if profile.integer_geometry:
            lengths = [*phantom.unit_mm, *(phantom.position_mm or phantom_corner(phantom))]
            if any(value != int(value) for value in lengths):
                raise ValueError(
                    f"tps.phantom: the {self.engine.profile} engine reads voxel sizes and the phantom's "
                    f"position as whole mm; unit_mm {list(phantom.unit_mm)} and position "
                    f"{list(phantom.position_mm or phantom_corner(phantom))} must be whole numbers "
                    "(give position_mm, or dims whose half-widths are whole mm)"
                )
        plane = profile.two_centimeter_plane
        if self.tps.two_centimeter_mode and math.prod(phantom.dims) < plane.min_phantom_voxels:
            raise ValueError(
                f"tps.phantom.dims {list(phantom.dims)}: with tps.two_centimeter_mode the "
                f"{self.engine.profile} engine needs at least {plane.min_phantom_voxels} phantom voxels "
                "(it sizes its scorer for the plane from them, and hangs if they are fewer)"
            )
        return self

    @model_validator(mode="after")
    def _backend_has_its_section(self) -> Settings:
        if self.backend.kind == "ssh" and self.ssh is None:
            raise ValueError(
                "backend.kind is ssh but there is no ssh: section "
                "(host, user, remote_root, engine_dir, engine_command; see config/examples/hpc-ssh.yaml)"
            )
        return self

    # -- resolved paths ----------------------------------------------------
    @property
    def source(self) -> str:
        return str(self._source) if self._source else "<defaults>"

    def _base(self) -> Path:
        return self._source.parent if self._source else Path.cwd()

    def _path(self, template: str, **fields: str) -> Path:
        path = Path(template.format(data_root=self.root, **fields))
        return path if path.is_absolute() else (self._base() / path)

    @property
    def root(self) -> Path:
        root = Path(self.data_root)
        return (root if root.is_absolute() else self._base() / root).resolve()

    @property
    def scan_dir(self) -> Path:
        return self._path(self.paths.scan_dir)

    @property
    def engine_dir(self) -> Path:
        return self._path(self.engine.workdir)

    def config_path(self, value: str) -> Path:
        """A plain path from the config (not a template): `~` expanded, relative to the config's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self._base() / path

    @property
    def results_dir(self) -> Path:
        return self._path(self.paths.results_dir)

    @property
    def machine(self) -> str:
        """This machine's name among the workers of one server."""
        return self.server.machine or socket.gethostname()

    def shared_paths(self) -> dict[str, str]:
        """server.shared_paths -> where this machine has them (per-case paths as templates)."""
        return {
            name: str(self._path(getattr(self.paths, name), case_id="{case_id}"))
            for name in self.server.shared_paths
        }

    def database_url(self, env: Mapping[str, str]) -> str | None:
        """The server's PostgreSQL URL, its password from `env`; None for SQLite. A secret: never print it."""
        server = self.server
        if not server.postgres:
            return None
        if server.password_env is None:
            return server.database
        password = env.get(server.password_env)
        if not password:
            raise ValueError(f"server.password_env: environment variable {server.password_env} is not set")
        scheme, rest = server.database.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[0]}:{quote(password, safe='')}@{rest.split('@', 1)[1]}"

    def work_dir(self, case_id: str) -> Path:
        return self._path(self.paths.work_dir, case_id=case_id)

    def output_dir(self, case_id: str) -> Path:
        return self._path(self.paths.output_dir, case_id=case_id)

    def qa_reference_dir(self, case_id: str) -> Path | None:
        """The configured folder of the case's QA references, if any (the case folder is always searched)."""
        return None if self.qa.reference_dir is None else self._path(self.qa.reference_dir, case_id=case_id)

    @property
    def engine_profile(self) -> EngineProfile:
        """The profile `engine.profile` names (checked when the settings were validated)."""
        return {**shipped_profiles(), **self.engine_profiles}[self.engine.profile]

    @property
    def required_ready_marker(self) -> str | None:
        """The ready marker a case folder must hold; None for sources with a quiet period (no marker)."""
        return self.case.ready_marker if self.sensor.quiet_seconds is None else None

    @property
    def case_flow_name(self) -> str:
        """The flow of the case deployment ('process-case' of 'process-case/case')."""
        return self.sensor.case_deployment.split("/", 1)[0]

    @property
    def case_deployment_name(self) -> str:
        """The case deployment's own name ('case' of 'process-case/case')."""
        return self.sensor.case_deployment.split("/", 1)[1]

    def max_running_cases(self) -> int:
        return self.sensor.max_running_cases or 2 * len(self.backend.gpus)


def phantom_corner(phantom: PhantomSettings) -> tuple[float, float, float]:
    """The default phantom position: centred on the beam axis, the beam entering its top face at z = 0."""
    (nx, ny, nz), (ux, uy, uz) = phantom.dims, phantom.unit_mm
    return (-nx * ux / 2, -ny * uy / 2, -nz * uz)


def python_executable() -> str:
    """The interpreter running us: the stand-in tools run under the same one."""
    return sys.executable
