"""What discovery hands on: a case, its treatment beams and the delivery chosen for each.

Small frozen pydantic models (they travel between Prefect tasks and into the sensor's
decisions), and CaseError, which lists every problem a folder has at once.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from config.settings import DeliveryPolicy
from tasks.casefolder.content import CaseContent
from tasks.casefolder.names import csv_dir_name

__all__ = ["Beam", "Case", "CaseError", "Delivery", "DeliveryPolicy", "ExcludedBeam", "Inspection"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Delivery(_Model):
    """One delivered field: a folder of machine logs named by its irradiation time."""

    folder: str
    path: str
    beam_number: int
    irradiation_time: datetime  # PlanInfo's TCSC_IRRAD_DATETIME, parsed: deliveries are ordered by it
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
    # The beam's other deliveries (other fractions), which the delivery policy did not choose.
    passed_over: list[Delivery] = []
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
    plan_path: (
        str  # the plan the run reads: the one found, then the run's copy (tasks/casefolder/plancopy.py)
    )
    plan_source: str  # the plan file found in the case folder
    patient_id: str
    study_instance_uid: str
    frame_of_reference_uid: str
    plan_sop_instance_uid: str
    plan_label: str
    machine: str
    room: int | None
    beams: list[Beam]
    excluded: list[ExcludedBeam]
    content: CaseContent  # the files discovery read, and their key: checked before GPU time is spent


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
    delivery_policy: DeliveryPolicy
    # Treatment beams without a delivery folder in a case with fewer delivery folders than
    # treatment beams: the transfer may still be delivering them.
    missing_deliveries: list[int] = []
    # What looks like files still being copied: the folder is empty, no RTPLAN yet (and no
    # unreadable file that could be it), a delivery folder has machine logs but no
    # PlanInfo.txt or no PlanRange yet, or files changed while the folder was read. The
    # sensor waits on these (and on missing_deliveries) rather than starting a run that
    # fails at discovery; each is also among `problems`.
    arriving: list[str] = []

    def incomplete_reasons(self) -> list[str]:
        """Why the folder looks half copied (the sensor waits for it); empty when it does not."""
        reasons = list(self.arriving)
        if self.missing_deliveries:
            beams = ", ".join(str(number) for number in self.missing_deliveries)
            reasons.append(f"treatment beam(s) {beams} have no delivery folder")
        return reasons

    def to_json_dict(self) -> dict[str, object]:
        """A compact summary for the CLI and for logs (no patient data beyond the case id)."""
        return {
            "case_id": self.case_id,
            "case_dir": self.case_dir,
            "ready": self.ready,
            "ok": not self.problems,
            "plan": self.plan_path,
            "delivery_policy": self.delivery_policy,
            "beams": [
                {
                    "beam_number": beam.number,
                    "beam_name": beam.name,
                    "gantry_angle": beam.gantry_angle,
                    "scan_mode": beam.scan_mode,
                    "layers": beam.layers,
                    "meterset": beam.meterset,
                    "delivery": beam.delivery.folder,
                    "irradiation_time": beam.delivery.irradiation_time.isoformat(),
                    "passed_over": [
                        {"delivery": other.folder, "irradiation_time": other.irradiation_time.isoformat()}
                        for other in beam.passed_over
                    ],
                }
                for beam in self.beams
            ],
            "excluded": [
                {"beam_number": beam.number, "beam_name": beam.name, "reason": beam.reason}
                for beam in self.excluded
            ],
            "problems": list(self.problems),
            "missing_deliveries": list(self.missing_deliveries),
            "arriving": list(self.arriving),
        }


class CaseError(ValueError):
    """A case folder that cannot be run; `problems` lists every reason."""

    def __init__(self, case_id: str, problems: list[str]) -> None:
        self.case_id = case_id
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{case_id}: {len(self.problems)} problem(s) in the case folder:\n{lines}")

    @property
    def cause(self) -> str:
        """Every problem on one line, without the case id (and the `.` of the case folder itself)."""
        return "; ".join(
            problem.removeprefix(f"{self.case_id}: ").removeprefix(".: ") for problem in self.problems
        )

    def __reduce__(self) -> tuple[type[CaseError], tuple[str, list[str]]]:
        # Results and states are pickled; the default reduce would call __init__ with the message.
        return (CaseError, (self.case_id, self.problems))
