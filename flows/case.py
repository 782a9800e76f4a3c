"""The case flow: one Prefect flow run per case folder, from folder to RTDOSE.

discover -> interpret -> tps (per beam) -> simulate (per beam, in parallel,
each on its own GPU) -> convert (per beam, as each finishes) -> plan sum ->
report. A failed beam does not stop the others; the run then ends Failed
with a message naming the beam, and the finished beams' RTDOSE are kept.

Finished simulations are reused (tasks/prefect_api/reuse.py): a new run of the case, or
Retry of a failed run in the UI, simulates only the beams whose inputs changed,
whose simulation failed, or that were asked for (`rerun_beams`, `force`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import Task, flow, unmapped
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from config import Settings, load_settings
from tasks.casefolder import Beam
from tasks.common.errors import cause_of
from tasks.common.labels import beam_subject
from tasks.convert import convert_beam, convert_plan
from tasks.discover import discover
from tasks.dose.outputs import DoseOutput
from tasks.gpu.limits import ensure_gpu_limits
from tasks.gpu.pool import GpuPool
from tasks.interpret import interpret
from tasks.moqui.beam import BeamInput, BeamResult
from tasks.outcome.summary import BeamRow
from tasks.prefect_api.reuse import beams_to_simulate_again, results_dir, simulation_cache_key
from tasks.report import report
from tasks.simulate import simulate
from tasks.tps import prepare_tps


def case_run_name() -> str:
    """Name each run after its case folder, so the run list reads like the worklist."""
    return Path(flow_run.parameters["case_dir"]).name


def _failure(future: PrefectFuture, subject: str) -> tuple[str, str]:
    """(one-line cause, whole message) of a failed task run, the cause without `subject`."""
    error = future.result(raise_on_failure=False)
    if isinstance(error, BaseException):
        return cause_of(error, subject), str(error)
    message = future.state.message or "failed"
    return message.splitlines()[0], message


def simulation(settings: Settings, refresh: bool) -> Task[[Settings, BeamInput], BeamResult]:
    """The simulate task with engine retries, cached by the beam's inputs in the data root."""
    return simulate.with_options(
        retries=settings.engine.retries,
        retry_delay_seconds=settings.engine.retry_delay_seconds,
        cache_key_fn=simulation_cache_key,
        persist_result=True,
        result_storage=results_dir(settings),
        refresh_cache=refresh,
    )


@flow(name="process-case", flow_run_name=case_run_name, log_prints=True)
def process_case(
    case_dir: str, config: str | None = None, rerun_beams: list[int] | None = None, force: bool = False
) -> State:
    """Recalculate the delivered dose of one case folder; `config` overrides MQI_CONFIG.

    Finished simulations with the same inputs are reused, except for the beam numbers in
    `rerun_beams`, or every beam with `force`.
    """
    settings = load_settings(config)
    ensure_gpu_limits(GpuPool.of(settings.backend))
    case = discover(settings, case_dir)
    csv_dir = interpret(settings, case)
    inputs = [
        future.result()
        for future in prepare_tps.map(unmapped(settings), unmapped(case), case.beams, unmapped(csv_dir))
    ]
    again = beams_to_simulate_again(settings, inputs, rerun_beams or [], force)
    logger = get_run_logger()
    for number, reason in again.items():
        logger.info("beam %s: %s", number, reason)
    simulations = [simulation(settings, beam.beam_number in again).submit(settings, beam) for beam in inputs]
    beam_of: dict[PrefectFuture, Beam] = dict(zip(simulations, case.beams, strict=True))

    rows: dict[int, BeamRow] = {}
    results: dict[int, BeamResult] = {}
    conversions: dict[int, PrefectFuture] = {}
    for future in as_completed(list(simulations)):
        beam = beam_of[future]
        subject = beam_subject(case.case_id, beam.number, beam.name)
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
            cause, message = _failure(future, subject)
            rows[beam.number] = BeamRow(
                beam=beam.number, name=beam.name, state="Failed", cause=cause, message=message
            )

    outputs: dict[int, DoseOutput] = {}
    for number, future in conversions.items():
        future.wait()
        if future.state.is_completed():
            outputs[number] = future.result()
            rows[number].output = Path(outputs[number].path).name
        else:
            cause, message = _failure(future, beam_subject(case.case_id, number, rows[number].name))
            rows[number].state = "Failed"
            rows[number].cause = f"conversion failed: {cause}"
            rows[number].message = f"conversion failed: {message}"

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
