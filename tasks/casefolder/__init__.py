"""Discovery of a case folder: the RT Ion Plan, its treatment beams and one delivery per beam.

Plain code, no Prefect, so the sensor, the case flow and the CLI judge a folder alike:
`model` (what discovery hands on), `names` (what may be read), `plan` (the RTPLAN),
`deliveries` (PlanInfo, PlanRange, machine logs), `matching` (deliveries to beams),
`inspect` (all of it, every problem at once), `content` (the folder's files as discovery
read them, and whether it still holds them), `plancopy` (the run's own copy of the plan).
"""

from tasks.casefolder.inspect import discover_case, inspect_case
from tasks.casefolder.model import Beam, Case, CaseError, Delivery, ExcludedBeam, Inspection
from tasks.casefolder.names import csv_dir_name, is_partial, name_problem

__all__ = [
    "Beam",
    "Case",
    "CaseError",
    "Delivery",
    "ExcludedBeam",
    "Inspection",
    "csv_dir_name",
    "discover_case",
    "inspect_case",
    "is_partial",
    "name_problem",
]
