"""The `mqi` command: check config, inspect a case, run one now, run the demo, write a sample case."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from config import ConfigError, Settings, load_settings
from deployments.prefect_env import apply_server_defaults, own_address

if TYPE_CHECKING:
    from tasks.gpu.nvidia_smi import GpuReport
    from tasks.gpu.pool import GpuPool

# Names and messages are data: printed as they are, never read as rich markup ("P1 [copy]").
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False)


def labelled(label: str, style: str, text: object) -> Text:
    """`label: text` with the label in `style` and the text verbatim."""
    return Text.assemble((label, style), f": {text}")


def described_line(key: str, value: str, description: str) -> Text:
    return Text.assemble(f"{key}: {value}  ", (f"# {description}", "dim"))


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    from config.explain import described
    from tasks.gpu.pool import GpuPool

    settings = _settings(args)
    if args.json:
        print(settings.model_dump_json(indent=2))
        return 0
    console.print(labelled("config OK", "green", settings.source))
    for key, value, description in described(settings):
        console.print(described_line(key, value, description))
    console.print(f"effective engine profile {settings.engine.profile}:")
    for key, value, description in described(settings.engine_profile, "  "):
        console.print(described_line(key, value, description))
    pool = GpuPool.of(settings.backend)
    console.print(
        f"data root: {settings.root}\nscan folder: {settings.scan_dir}\n"
        f"engine folder: {settings.engine_dir}\nGPU limits: {', '.join(pool.limit_names())}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tasks.casefolder import inspect_case
    from tasks.qa.check import case_references

    settings = _settings(args)
    found = inspect_case(
        Path(args.case_dir),
        ready_marker=settings.case.ready_marker,
        delivery_policy=settings.case.delivery_policy,
    )
    references = (
        case_references(
            settings,
            Path(found.case_dir),
            found.case.plan_sop_instance_uid,
            {beam.number: beam.name for beam in found.beams},
        )
        if found.case is not None
        else {}
    )
    if args.json:
        shown = found.to_json_dict()
        shown["qa_references"] = {
            str(number): [ref.model_dump() for ref in refs] for number, refs in references.items()
        }
        print(json.dumps(shown, indent=2, ensure_ascii=False))
        return 1 if found.problems else 0
    console.print(Text.assemble("case ", (found.case_id, "bold"), f"  ({found.case_dir})"))
    console.print(f"plan: {found.plan_path or 'not found'}")
    marker = settings.required_ready_marker
    if marker is None:
        console.print(
            f"ready marker: not required (ready after sensor.quiet_seconds: "
            f"{settings.sensor.quiet_seconds:g} s without changes)"
        )
    else:
        console.print(f"ready marker {marker}: {'present' if found.ready else 'MISSING'}")
    console.print(f"delivery policy: {found.delivery_policy}")
    table = Table(
        "beam",
        "name",
        "gantry",
        "layers",
        "delivery folder",
        "irradiated",
        title="treatment beams",
    )
    for beam in found.beams:
        table.add_row(
            str(beam.number),
            beam.name,
            f"{beam.gantry_angle:g}",
            str(beam.layers),
            beam.delivery.folder,
            f"{beam.delivery.irradiation_time:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)
    for beam in found.beams:
        refs = references.get(beam.number, [])
        shown_refs = ", ".join(f"{Path(ref.path).name} ({ref.kind})" for ref in refs) or "no reference"
        more = " (more than one: QA error)" if len(refs) > 1 else ""
        console.print(f"QA reference of beam {beam.number} ({beam.name}): {shown_refs}{more}")
    for beam in found.beams:
        for other in beam.passed_over:
            console.print(
                f"not recalculated: beam {beam.number} ({beam.name}) delivery {other.folder} "
                f"(irradiated {other.irradiation_time:%Y-%m-%d %H:%M:%S}): {found.delivery_policy} "
                f"chose {beam.delivery.folder}"
            )
    for ex in found.excluded:
        console.print(f"excluded: beam {ex.number} ({ex.name}): {ex.reason}")
    incomplete = found.incomplete_reasons()
    if incomplete:
        console.print(
            labelled(
                "looks half copied",
                "yellow",
                f"{'; '.join(incomplete)} (the file sensor waits and runs it once complete)",
            )
        )
    for problem in found.problems:
        err_console.print(labelled("problem", "red", problem))
    if not found.problems:
        console.print(Text("no problems found", style="green"))
    return 1 if found.problems else 0


def _print_outcome(settings: Settings, case_dir: Path, state: object) -> int:
    """Summary table from the provenance files the run wrote, then the final state message."""
    from tasks.common.labels import three_figures
    from tasks.qa.model import BeamQa

    out_dir = settings.output_dir(case_dir.name)
    rows = []
    for prov_path in sorted(out_dir.glob("*.provenance.json")):
        prov = json.loads(prov_path.read_text(encoding="utf-8"))
        max_dose = three_figures(prov["max_dose_gy"])
        qa = BeamQa(**prov["qa"]).shown if "qa" in prov else ""
        if prov["summation"] == "BEAM":
            beam = prov["beams"][0]
            label = f"{beam['beam_number']} ({beam['beam_name']})"
            rows.append([prov["rtdose"], label, str(beam["gpu"]), str(beam["attempts"]), max_dose, qa])
        else:
            rows.append([prov["rtdose"], "plan sum", "", "", max_dose, qa])
    with_qa = any(row[-1] for row in rows)  # a QA column only where some beam was compared
    table = Table(title=f"outputs in {out_dir}")
    table.add_column("file", no_wrap=True, min_width=len("RTDOSE_beam00.dcm"))
    for name in ("beam", "GPU", "attempts", "max dose (Gy)", *(("QA",) if with_qa else ())):
        table.add_column(name)
    for row in rows:
        table.add_row(*(row if with_qa else row[:-1]))
    console.print(table)
    ok = state.is_completed()  # type: ignore[attr-defined]
    colour = "green" if ok else "red"
    console.print(labelled(state.name, colour, state.message))  # type: ignore[attr-defined]
    return 0 if ok else 1


def _run_case(args: argparse.Namespace, case_dir: Path) -> int:
    """Run the case in this process; its run sends heartbeats as the workers' runs do, so that on a
    server `mqi up` set up, a killed `mqi run` is marked Crashed (not Running for ever, which would
    hold up every later run of the case) and a long one is not taken for a lost one."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from deployments.cluster import HEARTBEAT_SECONDS
    from flows.case import process_case

    settings = _settings(args)
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_SECONDS}):
        state = process_case(str(case_dir.resolve()), args.config, return_state=True)
    return _print_outcome(settings, case_dir, state)


def cmd_run(args: argparse.Namespace) -> int:
    case_dir = Path(args.case_dir)
    if not case_dir.is_dir():
        err_console.print(labelled("error", "red", f"{case_dir} is not a folder"))
        return 2
    return _run_case(args, case_dir)


def cmd_demo(args: argparse.Namespace) -> int:
    from standins.sample_case import write_sample_case
    from standins.tps_reference import write_tps_references
    from tasks.dose.outputs import water_surface_mm
    from tasks.moqui.inputs import dose_grid

    settings = _settings(args)
    settings.scan_dir.mkdir(parents=True, exist_ok=True)
    settings.engine_dir.mkdir(parents=True, exist_ok=True)
    case_id = datetime.now().strftime("DEMO-%Y%m%d-%H%M%S")
    case_dir = write_sample_case(settings.scan_dir, case_id, ready_marker=None)
    grid = dose_grid(settings, settings.engine_profile)
    written = write_tps_references(case_dir, grid, surface_mm=water_surface_mm(settings))
    (case_dir / settings.case.ready_marker).touch()  # last: the case is complete
    console.print(f"sample case written: {case_dir} (with {len(written)} stand-in TPS QA doses)")
    return _run_case(args, case_dir)


def cmd_server(args: argparse.Namespace) -> int:
    """Run a Prefect server with the project's settings (leases on disk, no vacuum, loopback)."""
    from deployments.cluster import database_env
    from deployments.server import ServiceError

    settings = _settings(args)
    try:
        os.environ.update(database_env(settings, dict(os.environ)))
    except ServiceError as error:
        err_console.print(labelled("error", "red", error))
        return 1
    prefect = Path(sys.executable).with_name("prefect")
    os.environ.update(own_address(args.port))
    database = "PostgreSQL" if settings.server.postgres else "SQLite"
    console.print(
        f"Prefect UI: http://{args.host}:{args.port}  ({database}; in another shell: "
        f"export PREFECT_API_URL=http://{args.host}:{args.port}/api)"
    )
    os.execv(prefect, [str(prefect), "server", "start", "--host", args.host, "--port", str(args.port)])
    return 0  # not reached: execv replaces this process


def cmd_sample_case(args: argparse.Namespace) -> int:
    from standins.sample_case import main as sample_main

    return sample_main(args.rest)


def cmd_gpus(args: argparse.Namespace) -> int:
    """nvidia-smi on the GPU host (this machine or the node over SSH), and who holds each GPU's lease.

    Either half is shown without the other: without nvidia-smi (the stand-in engine, no driver)
    the lease table from the server's GPU limits; without a server, nvidia-smi's view.
    """
    from dataclasses import asdict

    from deployments.server import api_url, connected, healthy
    from tasks.common.errors import PermanentError, ToolError
    from tasks.gpu.limits import ensure_slot_limits, gpu_status
    from tasks.gpu.nvidia_smi import GpuQueryError, gpu_report
    from tasks.gpu.pool import GpuPool
    from tasks.prefect_api.secrets import secret_value

    settings = _settings(args)
    pool = GpuPool.of(settings.backend)
    api = api_url(args.port, args.api)
    if settings.backend.kind == "slurm" and args.action == "show":
        return show_slurm_gpus(settings, args.json, api)
    if args.action == "sync":  # the Prefect limits gpu-<host>-<index> for backend.gpus (and Slurm's queue)
        with connected(api):
            done = ensure_slot_limits(settings)
        console.print("; ".join(f"{what}: {' '.join(names)}" for what, names in done.items() if names))
        return 0
    problems: list[str] = []
    try:
        report = gpu_report(settings, secret_value)
        problems += report.problems
    except (GpuQueryError, PermanentError, ToolError) as error:
        report = None
        problems.append(str(error))
    leases: dict[int, dict[str, object]] = {}
    if healthy(api):
        with connected(api):
            leases = {int(str(row["gpu"])): row for row in gpu_status(pool)}
    else:
        problems.append(f"no Prefect server answers at {api}: who holds the GPUs is not known")
    if args.json:
        shown = {**(asdict(report) if report else {}), "leases": list(leases.values()), "problems": problems}
        print(json.dumps(shown, indent=2, default=str))
        return 0 if report or leases else 1
    if report is not None:
        _print_smi(settings, report, leases)
    if leases:
        _print_leases(pool, leases)
    for problem in problems:
        err_console.print(labelled("warning", "yellow", problem))
    return 0 if report or leases else 1


def _lease_cell(lease: dict[str, object]) -> str:
    return " ".join(str(lease[key]) for key in ("state", "case", "beam") if lease.get(key))


def _print_smi(settings: Settings, report: GpuReport, leases: dict[int, dict[str, object]]) -> None:
    """nvidia-smi's view of the GPU host, each GPU with its lease."""

    def shown(value: object) -> str:
        return "-" if value is None else str(value)

    table = Table("GPU", "name", "memory used/total MiB", "temp °C", "util %", "lease", "processes")
    for gpu in report.gpus:
        configured = "" if gpu.index in settings.backend.gpus else " (not in backend.gpus)"
        table.add_row(
            f"{gpu.index}{configured}",
            gpu.name,
            f"{shown(gpu.memory_used_mib)}/{shown(gpu.memory_total_mib)}",
            shown(gpu.temperature_c),
            shown(gpu.utilization_pct),
            _lease_cell(leases.get(gpu.index, {})),
            "\n".join(f"{shown(p.pid)} {p.name} ({shown(p.used_memory_mib)} MiB)" for p in gpu.processes),
        )
    console.print(f"GPUs on {report.where}: {len(report.gpus)}")
    console.print(table)


def _print_leases(pool: GpuPool, leases: dict[int, dict[str, object]]) -> None:
    """The GPU leases on the server: each configured GPU's limit, state and holder."""
    from tasks.gpu.limits import leased_text

    rows = list(leases.values())
    table = Table("GPU", "limit", "lease", "case", "beam", "since", title=f"GPU leases on {pool.host}")
    for row in rows:
        table.add_row(*(str(row[key]) for key in ("gpu", "limit", "state", "case", "beam", "since")))
    console.print(table)
    console.print(leased_text(rows))


def _queue_places(settings: Settings, api: str) -> dict[str, object] | None:
    """Our places in Slurm's queue (slurm.max_queued_jobs) as the server counts them; None: no cap."""
    from deployments.server import connected, healthy
    from tasks.gpu.limits import GpuLimitMissing, places_taken
    from tasks.gpu.pool import SlurmQueue

    queue = SlurmQueue.of_settings(settings)
    if queue is None:
        return None
    shown: dict[str, object] = {"limit": queue.host, "size": queue.size, "taken": None, "problem": ""}
    if not healthy(api):
        shown["problem"] = f"no Prefect server answers at {api}: how many places are taken is not known"
        return shown
    with connected(api):
        try:
            shown["taken"], shown["size"] = places_taken(queue)
        except GpuLimitMissing as error:
            shown["problem"] = str(error)
    return shown


def show_slurm_gpus(settings: Settings, as_json: bool, api: str) -> int:
    """`mqi gpus` under Slurm: Slurm allocates the GPUs, so sinfo and squeue say who has them;
    with slurm.max_queued_jobs, the server says how many of our places in Slurm's queue are taken."""
    from dataclasses import asdict

    from tasks.backends import make_backend
    from tasks.backends.slurm import SlurmJobs, slurm_report
    from tasks.common.errors import ToolError
    from tasks.prefect_api.secrets import secret_value

    backend = make_backend(settings, secret_value)
    assert isinstance(backend, SlurmJobs)
    try:
        report = slurm_report(backend)
    except ToolError as error:
        err_console.print(labelled("error", "red", error))
        return 1
    places = _queue_places(settings, api)
    if as_json:
        print(json.dumps({**asdict(report), "queue_places": places}, indent=2))
        return 0
    nodes = Table("node", "partition", "state", "GPUs", "GPUs in use")
    for node in report.nodes:
        nodes.add_row(node.name, node.partition, node.state, node.gres, node.gres_used)
    console.print(f"Slurm GPU nodes, {report.where}: {len(report.nodes)}")
    console.print(nodes)
    jobs = Table("job", "name", "user", "state", "node", "GPUs", "time", "reason")
    for job in report.jobs:
        reason = "" if job.reason == "None" else job.reason
        jobs.add_row(job.job_id, job.name, job.user, job.state, job.nodes, job.gres, job.elapsed, reason)
    console.print(f"GPU jobs running or pending: {len(report.jobs)}")
    console.print(jobs)
    if places is not None:
        taken = "?" if places["taken"] is None else places["taken"]
        console.print(
            f"our places in Slurm's queue (slurm.max_queued_jobs, limit {places['limit']}): "
            f"{taken}/{places['size']} taken"
        )
        if places["problem"]:
            err_console.print(labelled("warning", "yellow", places["problem"]))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """The service in the foreground: server, deployments, worker, file sensor; Ctrl-C stops them."""
    from config import config_path
    from deployments.service import up

    if args.no_server and not (args.api or os.environ.get("PREFECT_API_URL")):
        err_console.print(
            labelled("error", "red", "--no-server needs the server's address: --api URL or PREFECT_API_URL")
        )
        return 2

    return up(
        _settings(args),
        config_path(args.config),
        port=args.port,
        worker_poll=args.worker_poll,
        warm=not args.plain_worker,
        api=args.api,
        server=not args.no_server,
        host=args.host,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from deployments.queries import print_status

    return print_status(_settings(args), args.port, args.limit, args.api)


def cmd_rerun(args: argparse.Namespace) -> int:
    from deployments.queries import start_rerun

    return start_rerun(_settings(args), args.port, args.case, args.beam, args.force, args.wait, args.api)


def cmd_cancel(args: argparse.Namespace) -> int:
    from deployments.cancel import print_cancel
    from deployments.server import api_url

    return print_cancel(_settings(args), api_url(args.port, args.api), args.case)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqi", description=__doc__)
    parser.add_argument("--config", help="config file (default: $MQI_CONFIG or config/config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate and print the effective configuration, each setting with its description"
    )
    check.add_argument("--json", action="store_true", help="the effective configuration as JSON")
    check.set_defaults(func=cmd_config_check)

    inspect = sub.add_parser("inspect", help="show what a case would do, without running anything")
    inspect.add_argument("case_dir")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=cmd_inspect)

    run = sub.add_parser("run", help="run one case now and print its outputs")
    run.add_argument("case_dir")
    run.set_defaults(func=cmd_run)

    sub.add_parser(
        "demo", help="write a sample case into the scan folder and run it end to end"
    ).set_defaults(func=cmd_demo)

    server = sub.add_parser("server", help="run a local Prefect server (UI) with the project's settings")
    server.add_argument("--port", type=int, default=4200, help="port on 127.0.0.1 (4200)")
    host_help = "address the server listens on (127.0.0.1; 0.0.0.0 for workers on other machines)"
    server.add_argument("--host", default="127.0.0.1", help=host_help)
    server.set_defaults(func=cmd_server)

    def server_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--port", type=int, help="the local server on 127.0.0.1:PORT (wins over PREFECT_API_URL)"
        )
        command.add_argument(
            "--api", help="the Prefect API URL, e.g. http://host:4200/api (wins over --port, PREFECT_API_URL)"
        )

    up = sub.add_parser(
        "up", help="run the service: server, deployments, worker and file sensor (Ctrl-C stops)"
    )
    server_options(up)
    up.add_argument("--host", default="127.0.0.1", help=host_help)
    up.add_argument(
        "--no-server",
        action="store_true",
        help="only a worker for this machine's GPUs, on the server at --api (no server, sensor or deploy)",
    )
    up.add_argument("--worker-poll", type=float, default=0.5, help="seconds between the worker's polls (0.5)")
    up.add_argument(
        "--plain-worker",
        action="store_true",
        help="Prefect's own process worker: a new interpreter per flow run (about 2 s slower to start)",
    )
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="recent case runs: state, beams done, duration")
    server_options(status)
    status.add_argument("--limit", type=int, default=20, help="how many runs (20)")
    status.set_defaults(func=cmd_status)

    rerun = sub.add_parser("rerun", help="run a case again, reusing the beams that already finished")
    rerun.add_argument("case", help="case id (in the scan folder) or case folder")
    rerun.add_argument(
        "--beam", type=int, action="append", default=[], help="simulate beam N again (repeatable)"
    )
    rerun.add_argument("--force", action="store_true", help="simulate every beam again")
    rerun.add_argument("--wait", action="store_true", help="wait for the run and print its final state")
    server_options(rerun)
    rerun.set_defaults(func=cmd_rerun)

    cancel = sub.add_parser(
        "cancel", help="cancel a case's active run: its engines are stopped and their GPUs released"
    )
    cancel.add_argument("case", help="case id (the case folder's name)")
    server_options(cancel)
    cancel.set_defaults(func=cmd_cancel)

    gpus = sub.add_parser("gpus", help="the GPU host's GPUs and processes (nvidia-smi), and their leases")
    gpus.add_argument(
        "action", nargs="?", choices=["show", "sync"], default="show", help="sync: create the GPU limits"
    )
    gpus.add_argument("--json", action="store_true", help="machine-readable output")
    server_options(gpus)
    gpus.set_defaults(func=cmd_gpus)

    sample = sub.add_parser("sample-case", help="write a synthetic case folder (see --help)", add_help=False)
    sample.add_argument("rest", nargs=argparse.REMAINDER)
    sample.set_defaults(func=cmd_sample_case)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "sample-case":  # its options, --help too, are its own parser's
        args.rest = [*rest, *args.rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    apply_server_defaults()
    try:
        return args.func(args)
    except ConfigError as err:
        err_console.print(labelled("configuration error", "red", err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
