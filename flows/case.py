"""The case flow: one Prefect flow run per case folder, from folder to RTDOSE.

discover -> interpret -> tps (per beam) -> simulate (per beam, in parallel,
each on its own GPU) -> convert (per beam, as each finishes) -> plan sum ->
report. A failed beam does not stop the others; the run then ends Failed
with a message naming the beam, and the finished beams' RTDOSE are kept.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, tags, unmapped
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from config import load_settings
from tasks.casefolder import Beam
from tasks.convert import DoseOutput, convert_beam, convert_plan
from tasks.discover import discover
from tasks.gpu import ensure_gpu_limits
from tasks.interpret import interpret
from tasks.report import BeamRow, report
from tasks.simulate import BeamResult, simulate
from tasks.tps import write_tps


def case_run_name() -> str:
    """Name each run after its case folder, so the run list reads like the worklist."""
    return Path(flow_run.parameters["case_dir"]).name


def _error_text(future: PrefectFuture) -> str:
    error = future.result(raise_on_failure=False)
    return str(error) if isinstance(error, BaseException) else (future.state.message or "failed")


@flow(name="process-case", flow_run_name=case_run_name, log_prints=True)
def process_case(case_dir: str, config: str | None = None) -> State:
    """Recalculate the delivered dose of one case folder; `config` overrides MQI_CONFIG."""
    settings = load_settings(config)
    ensure_gpu_limits(settings)
    case = discover(settings, case_dir)
    with tags(f"case:{case.case_id}"):
        csv_dir = interpret(settings, case)
        inputs = write_tps.map(unmapped(settings), unmapped(case), case.beams, unmapped(csv_dir))
        simulate_with_retries = simulate.with_options(
            retries=settings.engine.retries, retry_delay_seconds=settings.engine.retry_delay_seconds
        )
        simulations = simulate_with_retries.map(unmapped(settings), inputs)
        beam_of: dict[PrefectFuture, Beam] = dict(zip(simulations, case.beams, strict=True))

        rows: dict[int, BeamRow] = {}
        results: dict[int, BeamResult] = {}
        conversions: dict[int, PrefectFuture] = {}
        for future in as_completed(list(simulations)):
            beam = beam_of[future]
            future.wait()  # sets the final state locally; the API may not have it yet
            if future.state.is_completed():
                result = future.result()
                results[beam.number] = result
                conversions[beam.number] = convert_beam.submit(settings, case, result)
                rows[beam.number] = BeamRow(
                    beam=beam.number,
                    name=beam.name,
                    state="Completed",
                    gpu=result.gpu,
                    attempts=result.attempts,
                    duration_s=round(result.ended - result.started, 1),
                )
            else:
                rows[beam.number] = BeamRow(
                    beam=beam.number, name=beam.name, state="Failed", message=_error_text(future)
                )

        outputs: dict[int, DoseOutput] = {}
        for number, future in conversions.items():
            future.wait()
            if future.state.is_completed():
                outputs[number] = future.result()
                rows[number].output = Path(outputs[number].path).name
            else:
                rows[number].state = "Failed"
                rows[number].message = f"conversion failed: {_error_text(future)}"

        ordered = [rows[beam.number] for beam in case.beams]
        plan_sum = None
        if len(outputs) == len(case.beams):
            plan = convert_plan(
                settings,
                case,
                [results[b.number] for b in case.beams],
                [outputs[b.number] for b in case.beams],
            )
            plan_sum = plan.path
        message = report(case, ordered, plan_sum)
    if all(row.state == "Completed" for row in ordered) and plan_sum:
        return Completed(message=message)
    return Failed(message=message)
