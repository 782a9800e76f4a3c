"""The `mqi` command: check config, inspect a case, run one now, run the demo, write a sample case."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config import ConfigError, Settings, load_settings
from deployments.prefect_env import apply_server_defaults

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def cmd_config_check(args: argparse.Namespace) -> int:
    from config.explain import described
    from tasks.gpu.pool import GpuPool

    settings = _settings(args)
    if args.json:
        print(settings.model_dump_json(indent=2))
        return 0
    console.print(f"[green]config OK[/green]: {escape(settings.source)}")
    for key, value, description in described(settings):
        console.print(f"{escape(key)}: {escape(value)}  [dim]# {escape(description)}[/dim]")
    console.print(f"effective engine profile {escape(settings.engine.profile)}:")
    for key, value, description in described(settings.engine_profile, "  "):
        console.print(f"{escape(key)}: {escape(value)}  [dim]# {escape(description)}[/dim]")
    pool = GpuPool.of(settings.backend)
    console.print(
        escape(
            f"data root: {settings.root}\nscan folder: {settings.scan_dir}\n"
            f"engine folder: {settings.engine_dir}\nGPU limits: {', '.join(pool.limit_names())}"
        )
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tasks.casefolder import inspect_case

    settings = _settings(args)
    found = inspect_case(
        Path(args.case_dir),
        ready_marker=settings.case.ready_marker,
        delivery_policy=settings.case.delivery_policy,
    )
    if args.json:
        print(json.dumps(found.to_json_dict(), indent=2, ensure_ascii=False))
        return 1 if found.problems else 0
    console.print(f"case [bold]{found.case_id}[/bold]  ({found.case_dir})")
    console.print(f"plan: {found.plan_path or 'not found'}")
    marker = settings.required_ready_marker
    if marker is None:
        console.print(
            f"ready marker: not required (ready after sensor.quiet_seconds: "
            f"{settings.sensor.quiet_seconds:g} s without changes)"
        )
    else:
        console.print(f"ready marker {marker}: {'present' if found.ready else 'MISSING'}")
    table = Table("beam", "name", "gantry", "layers", "delivery folder", title="treatment beams")
    for beam in found.beams:
        table.add_row(
            str(beam.number), beam.name, f"{beam.gantry_angle:g}", str(beam.layers), beam.delivery.folder
        )
    console.print(table)
    for ex in found.excluded:
        console.print(f"excluded: beam {ex.number} ({ex.name}): {ex.reason}")
    for problem in found.problems:
        err_console.print(f"[red]problem[/red]: {problem}")
    if not found.problems:
        console.print("[green]no problems found[/green]")
    return 1 if found.problems else 0


def _print_outcome(settings: Settings, case_dir: Path, state: object) -> int:
    """Summary table from the provenance files the run wrote, then the final state message."""
    out_dir = settings.output_dir(case_dir.name)
    table = Table("file", "beam", "GPU", "attempts", "max dose (Gy)", title=f"outputs in {out_dir}")
    for prov_path in sorted(out_dir.glob("*.provenance.json")):
        prov = json.loads(prov_path.read_text(encoding="utf-8"))
        max_dose = f"{prov['max_dose_gy']:.3g}"
        if prov["summation"] == "BEAM":
            beam = prov["beams"][0]
            label, gpu, attempts = (
                f"{beam['beam_number']} ({beam['beam_name']})",
                beam["gpu"],
                beam["attempts"],
            )
            table.add_row(prov["rtdose"], label, str(gpu), str(attempts), max_dose)
        else:
            table.add_row(prov["rtdose"], "plan sum", "", "", max_dose)
    console.print(table)
    ok = state.is_completed()  # type: ignore[attr-defined]
    colour = "green" if ok else "red"
    console.print(f"[{colour}]{state.name}[/{colour}]: {state.message}")  # type: ignore[attr-defined]
    return 0 if ok else 1


def _run_case(args: argparse.Namespace, case_dir: Path) -> int:
    from flows.case import process_case

    settings = _settings(args)
    state = process_case(str(case_dir.resolve()), args.config, return_state=True)
    return _print_outcome(settings, case_dir, state)


def cmd_run(args: argparse.Namespace) -> int:
    case_dir = Path(args.case_dir)
    if not case_dir.is_dir():
        err_console.print(f"[red]error[/red]: {case_dir} is not a folder")
        return 2
    return _run_case(args, case_dir)


def cmd_demo(args: argparse.Namespace) -> int:
    from standins.sample_case import write_sample_case

    settings = _settings(args)
    settings.scan_dir.mkdir(parents=True, exist_ok=True)
    settings.engine_dir.mkdir(parents=True, exist_ok=True)
    case_id = datetime.now().strftime("DEMO-%Y%m%d-%H%M%S")
    case_dir = write_sample_case(settings.scan_dir, case_id, ready_marker=settings.case.ready_marker)
    console.print(f"sample case written: {case_dir}")
    return _run_case(args, case_dir)


def cmd_server(args: argparse.Namespace) -> int:
    """Run a Prefect server with the project's settings (leases on disk, no vacuum, loopback)."""
    prefect = Path(sys.executable).with_name("prefect")
    console.print(
        f"Prefect UI: http://127.0.0.1:{args.port}  (in another shell: "
        f"export PREFECT_API_URL=http://127.0.0.1:{args.port}/api)"
    )
    os.execv(prefect, [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(args.port)])
    return 0  # not reached: execv replaces this process


def cmd_sample_case(args: argparse.Namespace) -> int:
    from standins.sample_case import main as sample_main

    return sample_main(args.rest)


def cmd_gpus(args: argparse.Namespace) -> int:
    """nvidia-smi on the GPU host (this machine or the node over SSH), and who holds each GPU's lease."""
    from dataclasses import asdict

    from tasks.common.errors import PermanentError, ToolError
    from tasks.gpu.limits import ensure_gpu_limits, gpu_status
    from tasks.gpu.nvidia_smi import GpuQueryError, gpu_report
    from tasks.gpu.pool import GpuPool
    from tasks.prefect_api.secrets import secret_value

    settings = _settings(args)
    pool = GpuPool.of(settings.backend)
    if args.action == "sync":  # the Prefect limits gpu-<host>-<index> for backend.gpus
        done = ensure_gpu_limits(pool)
        console.print("; ".join(f"{what}: {' '.join(names)}" for what, names in done.items() if names))
        return 0
    try:
        report = gpu_report(settings, secret_value)
    except (GpuQueryError, PermanentError, ToolError) as error:
        err_console.print(f"[red]error[/red]: {error}")
        return 1
    leases = {}
    if os.environ.get("PREFECT_API_URL"):  # only a running server knows the leases
        leases = {row["gpu"]: row for row in gpu_status(pool)}
    if args.json:
        print(json.dumps({**asdict(report), "leases": list(leases.values())}, indent=2, default=str))
        return 0
    table = Table("GPU", "name", "memory used/total MiB", "temp °C", "util %", "lease", "processes")

    def shown(value: object) -> str:
        return "-" if value is None else str(value)

    for gpu in report.gpus:
        lease = leases.get(gpu.index, {})
        held = f"{lease['state']} {lease['case']} {lease['beam']}".strip() if lease else ""
        configured = "" if gpu.index in settings.backend.gpus else " (not in backend.gpus)"
        table.add_row(
            f"{gpu.index}{configured}",
            gpu.name,
            f"{shown(gpu.memory_used_mib)}/{shown(gpu.memory_total_mib)}",
            shown(gpu.temperature_c),
            shown(gpu.utilization_pct),
            held,
            "\n".join(f"{shown(p.pid)} {p.name} ({shown(p.used_memory_mib)} MiB)" for p in gpu.processes),
        )
    console.print(f"GPUs on {report.where}: {len(report.gpus)}")
    console.print(table)
    for problem in report.problems:
        err_console.print(f"[yellow]warning[/yellow]: {problem}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """The service in the foreground: server, deployments, worker, file sensor; Ctrl-C stops them."""
    from config import config_path
    from deployments.service import up

    return up(
        _settings(args),
        config_path(args.config),
        port=args.port,
        worker_poll=args.worker_poll,
        warm=not args.plain_worker,
    )


def cmd_status(args: argparse.Namespace) -> int:
    from deployments.queries import print_status

    return print_status(_settings(args), args.port, args.limit)


def cmd_rerun(args: argparse.Namespace) -> int:
    from deployments.queries import start_rerun

    return start_rerun(_settings(args), args.port, args.case, args.beam, args.force, args.wait)


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
    server.add_argument("--port", type=int, default=4200)
    server.set_defaults(func=cmd_server)

    port_help = "port of the local server (default 4200; PREFECT_API_URL, when set, wins)"
    up = sub.add_parser(
        "up", help="run the service: server, deployments, worker and file sensor (Ctrl-C stops)"
    )
    up.add_argument("--port", type=int, default=4200, help=port_help)
    up.add_argument("--worker-poll", type=float, default=0.5, help="seconds between the worker's polls (0.5)")
    up.add_argument(
        "--plain-worker",
        action="store_true",
        help="Prefect's own process worker: a new interpreter per flow run (about 2 s slower to start)",
    )
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="recent case runs: state, beams done, duration")
    status.add_argument("--port", type=int, default=4200, help=port_help)
    status.add_argument("--limit", type=int, default=20, help="how many runs (20)")
    status.set_defaults(func=cmd_status)

    rerun = sub.add_parser("rerun", help="run a case again, reusing the beams that already finished")
    rerun.add_argument("case", help="case id (in the scan folder) or case folder")
    rerun.add_argument(
        "--beam", type=int, action="append", default=[], help="simulate beam N again (repeatable)"
    )
    rerun.add_argument("--force", action="store_true", help="simulate every beam again")
    rerun.add_argument("--wait", action="store_true", help="wait for the run and print its final state")
    rerun.add_argument("--port", type=int, default=4200, help=port_help)
    rerun.set_defaults(func=cmd_rerun)

    gpus = sub.add_parser("gpus", help="the GPU host's GPUs and processes (nvidia-smi), and their leases")
    gpus.add_argument(
        "action", nargs="?", choices=["show", "sync"], default="show", help="sync: create the GPU limits"
    )
    gpus.add_argument("--json", action="store_true", help="machine-readable output")
    gpus.set_defaults(func=cmd_gpus)

    sample = sub.add_parser("sample-case", help="write a synthetic case folder (see --help)", add_help=False)
    sample.add_argument("rest", nargs=argparse.REMAINDER)
    sample.set_defaults(func=cmd_sample_case)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_server_defaults()
    try:
        return args.func(args)
    except ConfigError as err:
        err_console.print(f"[red]configuration error[/red]: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
