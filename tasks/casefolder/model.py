"""What discovery hands on: a case, its treatment beams and the delivery chosen for each.

Small frozen pydantic models (they travel between Prefect tasks and into the sensor's
decisions), and CaseError, which lists every problem a folder has at once.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from config.settings import DeliveryPolicy
from tasks.casefolder.names import csv_dir_name

__all__ = ["Beam", "Case", "CaseError", "Delivery", "DeliveryPolicy", "ExcludedBeam", "Inspection"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Delivery(_Model):
    """One delivered field: a folder of machine logs named by its irradiation time."""

    folder: str
    path: str
    beam_number: int
    irradiation_time: str
    layers: int
    patient_id: str


class Beam(_Model):
    """A treatment beam of the plan with the delivery chosen for it."""

    number: int
    name: str
    gantry_angle: float
    isocenter_mm: tuple[float, float, float]
    layers: int
    scan_mode: str
    meterset: float
    delivery: Delivery
    range_shifters: int = 0  # NumberOfRangeShifters: beamline elements before the phantom
    blocks: int = 0  # NumberOfBlocks

    @property
    def csv_dir_name(self) -> str:
        """The interpreter's output folder for this beam."""
        return csv_dir_name(self.name)


class ExcludedBeam(_Model):
    """A beam of the plan that is not simulated, and why."""

    number: int
    name: str
    reason: str


class Case(_Model):
    """A case folder that passed every check: what the rest of the pipeline needs of it."""

    case_id: str
    case_dir: str
    plan_path: str
    patient_id: str
    study_instance_uid: str
    frame_of_reference_uid: str
    plan_sop_instance_uid: str
    plan_label: str
    machine: str
    room: int | None
    beams: list[Beam]
    excluded: list[ExcludedBeam]


class Inspection(_Model):
    """Everything discovery found in a case folder, good and bad; `case` is set only when clean."""

    case_id: str
    case_dir: str
    ready: bool
    plan_path: str | None
    beams: list[Beam]
    excluded: list[ExcludedBeam]
    problems: list[str]
    case: Case | None
    # Treatment beams without a delivery folder in a case with fewer delivery folders than
    # treatment beams: the transfer may still be delivering them.
    missing_deliveries: list[int] = []

    def to_json_dict(self) -> dict[str, object]:
        """A compact summary for the CLI and for logs (no patient data beyond the case id)."""
        return {
            "case_id": self.case_id,
            "case_dir": self.case_dir,
            "ready": self.ready,
            "ok": not self.problems,
            "plan": self.plan_path,
            "beams": [
                {
                    "beam_number": beam.number,
                    "beam_name": beam.name,
                    "gantry_angle": beam.gantry_angle,
                    "scan_mode": beam.scan_mode,
                    "layers": beam.layers,
                    "meterset": beam.meterset,
                    "delivery": beam.delivery.folder,
                    "irradiation_time": beam.delivery.irradiation_time,
                }
                for beam in self.beams
            ],
            "excluded": [
                {"beam_number": beam.number, "beam_name": beam.name, "reason": beam.reason}
                for beam in self.excluded
            ],
            "problems": list(self.problems),
            "missing_deliveries": list(self.missing_deliveries),
        }


class CaseError(ValueError):
    """A case folder that cannot be run; `problems` lists every reason."""

    def __init__(self, case_id: str, problems: list[str]) -> None:
        self.case_id = case_id
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{case_id}: {len(self.problems)} problem(s) in the case folder:\n{lines}")

    def __reduce__(self) -> tuple[type[CaseError], tuple[str, list[str]]]:
        # Results and states are pickled; the default reduce would call __init__ with the message.
        return (CaseError, (self.case_id, self.problems))
