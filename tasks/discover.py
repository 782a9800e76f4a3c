"""Prefect task: discovery of a case folder (tasks/casefolder), its beams and deliveries in the run log.

The case handed on reads the run's copy of the plan (tasks/casefolder/plancopy.py), made
while the folder still holds what discovery read (checked right after the copy).
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger
from prefect.states import Failed, State

from config.settings import Settings
from tasks.casefolder import Case, CaseError, discover_case
from tasks.casefolder.content import check_unchanged
from tasks.casefolder.plancopy import keep_plan_copy


@task(name="discover", task_run_name="discover {case_dir}")
def discover(settings: Settings, case_dir: str) -> Case | State:
    """Folder -> Case, or a Failed state holding the CaseError (raised again in the flow) that
    names every problem found (by folder, file and beam).

    The ready marker is required unless the sensor is configured with a quiet period:
    such sources write no marker.
    """
    logger = get_run_logger()
    try:
        found = discover_case(
            Path(case_dir),
            ready_marker=settings.required_ready_marker,
            delivery_policy=settings.case.delivery_policy,
        )
    except CaseError as error:  # bad input: each problem once in the log, no traceback
        for problem in error.problems:
            logger.error("%s", problem)
        return Failed(message=error.cause, data=error)
    case = keep_plan_copy(found, settings.work_dir(found.case_id))
    check_unchanged(case.content)
    for beam in case.beams:
        logger.info(
            "beam %s (%s): gantry %g deg, %s layers, delivery %s",
            beam.number,
            beam.name,
            beam.gantry_angle,
            beam.layers,
            beam.delivery.folder,
        )
    for excluded in case.excluded:
        logger.info("beam %s (%s) excluded: %s", excluded.number, excluded.name, excluded.reason)
    return case
