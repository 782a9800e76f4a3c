"""Prefect tasks: each beam's RTDOSE as soon as its simulation ends, then the plan sum (tasks/dose)."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from config.settings import Settings
from tasks.casefolder import Case
from tasks.common.labels import three_figures
from tasks.dose.outputs import DoseOutput, convert_beam_dose, convert_plan_dose, copy_engine_log
from tasks.moqui.beam import BeamResult


@task(name="convert", task_run_name="convert beam {result.beam.beam_number}")
def convert_beam(settings: Settings, case: Case, result: BeamResult) -> DoseOutput:
    """Prefect wrapper: one beam's RTDOSE + provenance."""
    output = convert_beam_dose(settings, case, result)
    copy_engine_log(settings, case, result)
    get_run_logger().info(
        "%s: %s (max %s Gy)", result.beam.label, output.path, three_figures(output.max_dose_gy)
    )
    return output


@task(name="plan-sum", task_run_name="plan sum {case.case_id}")
def convert_plan(
    settings: Settings, case: Case, results: list[BeamResult], beams: list[DoseOutput]
) -> DoseOutput:
    """Prefect wrapper: the plan-sum RTDOSE + provenance."""
    output = convert_plan_dose(settings, case, results, beams)
    get_run_logger().info("plan sum: %s (max %s Gy)", output.path, three_figures(output.max_dose_gy))
    return output
