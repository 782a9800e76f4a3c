"""Prefect task: discovery of a case folder (tasks/casefolder), its beams and deliveries in the run log."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from config.settings import Settings
from tasks.casefolder import Case, discover_case


@task(name="discover", task_run_name="discover {case_dir}")
def discover(settings: Settings, case_dir: str) -> Case:
    """Folder -> Case, failing with every problem found (named by folder, file and beam).

    The ready marker is required unless the sensor is configured with a quiet period:
    such sources write no marker.
    """
    case = discover_case(
        Path(case_dir),
        ready_marker=settings.required_ready_marker,
        delivery_policy=settings.case.delivery_policy,
    )
    logger = get_run_logger()
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
