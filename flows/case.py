"""The case flow: one Prefect flow run per case folder, from folder to RTDOSE.

discover -> interpret -> tps (per beam) -> simulate (per beam, in parallel,
each on its own GPU) -> convert (per beam, as each finishes) -> QA (per beam: gamma
against its reference, if it has one) -> plan sum -> report. A failed QA does not fail
the run (the dose was delivered as recalculated): it tags it qa:fail and leads the
summary. A failed beam does not stop the others; the run then ends Failed with a
message naming the beam, and the finished beams' RTDOSE are kept.

Finished simulations are reused (tasks/prefect_api/reuse.py): a new run of the case, or
Retry of a failed run in the UI, simulates only the beams whose inputs changed,
whose simulation failed, or that were asked for (`rerun_beams`, `force`).
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import httpx
from prefect import Task, flow, unmapped
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Crashed, Failed, State

from config import Settings, load_settings
from tasks.casefolder import Beam, Case, CaseError
from tasks.common.errors import MqiError, cause_of
from tasks.common.labels import beam_subject
from tasks.common.stopping import stop_on_sigterm
from tasks.convert import convert_beam, convert_plan
from tasks.discover import discover
from tasks.dose.outputs import DoseOutput
from tasks.gamma import check_qa, find_qa_references, qa_report
from tasks.gpu.limits import ensure_slot_limits
from tasks.interpret import interpret
from tasks.moqui.beam import BeamInput, BeamResult
from tasks.outcome.summary import BeamRow, not_run_message
from tasks.prefect_api.case_turn import wait_for_turn
from tasks.prefect_api.client import api_client, server_unavailable
from tasks.prefect_api.internals import quiet_deliberate_failure
from tasks.prefect_api.reuse import beams_to_simulate_again, results_dir, simulation_cache_key
from tasks.qa.model import BeamQa
from tasks.report import report, report_not_run
from tasks.simulate import simulate
from tasks.tps import prepare_tps


def case_run_name() -> str:
    """Name each run after its case folder, so the run list reads like the worklist."""
    return Path(flow_run.parameters["case_dir"]).name


def _failure(future: PrefectFuture, subject: str) -> tuple[str, str, dict[str, float]]:
    """(one-line cause, whole message, facts of the run) of a failed task run, the cause without `subject`."""
    error = future.result(raise_on_failure=False)
    if isinstance(error, BaseException) and server_unavailable(error):
        raise error  # the server went away, not the beam's fault: the run ends Crashed, and is resumed
    if isinstance(error, BaseException):
        return cause_of(error, subject), str(error), getattr(error, "facts", {})
    message = future.state.message or "failed"
    return message.splitlines()[0], message, {}


def _not_run(case_dir: str, error: CaseError | MqiError) -> State:
    """Failed with one line of cause and a summary holding the whole error, not a traceback."""
    case_id = getattr(error, "case_id", None) or Path(case_dir).name
    message = not_run_message(case_id, cause_of(error, f"case {case_id}"))
    report_not_run(case_id, case_dir, message, str(error))
    return Failed(message=message)


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
    with stop_on_sigterm():  # `mqi up` stopping: beams end at once, their engine jobs go on
        try:
            return _recalculate(case_dir, config, rerun_beams or [], force)
        except httpx.HTTPError as error:  # the server went away: not the case's fault
            if not server_unavailable(error):
                raise
            return Crashed(
                message=f"lost the Prefect server ({type(error).__name__}: {error}); "
                "the file sensor resumes the run, adopting its engine jobs"
            )


def _recalculate(case_dir: str, config: str | None, rerun_beams: list[int], force: bool) -> State:
    settings = load_settings(config)
    logger = get_run_logger()
    with api_client() as client:
        wait_for_turn(client, settings.case_flow_name, Path(case_dir), UUID(flow_run.id), logger.info)
    quiet_deliberate_failure()
    ensure_slot_limits(settings)
    try:
        case: Case = discover(settings, case_dir, return_state=True).result()  # raises its CaseError
        references = find_qa_references(settings, case)
        csv_dir = interpret(settings, case)
        inputs = [
            future.result()
            for future in prepare_tps.map(unmapped(settings), unmapped(case), case.beams, unmapped(csv_dir))
        ]
    except (CaseError, MqiError) as error:  # bad input, or the interpreter failed: no beam ran
        return _not_run(case_dir, error)
    again = beams_to_simulate_again(settings, inputs, rerun_beams, force)
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
            cause, message, facts = _failure(future, subject)
            rows[beam.number] = BeamRow(
                beam=beam.number,
                name=beam.name,
                state="Failed",
                gpu=facts.get("gpu"),
                attempts=facts.get("attempts"),
                duration_s=facts.get("seconds"),
                cause=cause,
                message=message,
            )

    outputs: dict[int, DoseOutput] = {}
    checks: dict[int, PrefectFuture] = {}
    for number, future in conversions.items():
        future.wait()
        if future.state.is_completed():
            outputs[number] = future.result()
            rows[number].output = Path(outputs[number].path).name
            checks[number] = check_qa.submit(settings, case, outputs[number], references[number])
        else:
            cause, message, _ = _failure(future, beam_subject(case.case_id, number, rows[number].name))
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
    qa: list[BeamQa] = []
    for number, future in sorted(checks.items()):
        future.wait()
        if future.state.is_completed():
            qa.append(future.result())
        else:
            cause, _, _ = _failure(future, beam_subject(case.case_id, number, rows[number].name))
            qa.append(BeamQa(beam_number=number, verdict="error", message=cause))
        rows[number].qa = qa[-1].shown
    verdict = qa_report(settings, case, qa) if qa else ""
    message = report(case, ordered, plan_sum, verdict)
    if all(row.state == "Completed" for row in ordered) and plan_sum:
        return Completed(message=message)
    return Failed(message=message)
