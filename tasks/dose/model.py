"""What an RTDOSE written or read here is, and the error every dose problem raises."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RT_DOSE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"
RT_PLAN_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.481.8")
DOSE_TYPES = ("PHYSICAL", "EFFECTIVE", "ERROR")
PIXEL_DATA_TAG = 0x7FE00010


@dataclass(frozen=True)
class DoseFrame:
    """The frame of reference a dose grid is in, as its RTDOSE file says it.

    The engine scores in a beam-aligned water phantom, not in the patient: such a dose
    gets a frame of reference of its own (one per plan, shared by its beams and their
    sum), never the plan's, so that no tool overlays it on the patient's CT, and a
    DoseComment that says what the coordinates are.
    """

    uid: str
    comment: str  # DoseComment (3004,0006): what the coordinates mean
    label: str  # in SeriesDescription: "water phantom", "2 cm plane"


class RtDoseError(ValueError):
    """A dose file that cannot be written, read or trusted; the message names the file."""


@dataclass(frozen=True)
class RtDoseInfo:
    """What a written or collected RTDOSE holds; small enough to pass between tasks."""

    path: Path
    max_dose_gy: float
    scaling: float
    summation: str
    beam_number: int | None
    sha256: str
