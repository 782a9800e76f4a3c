"""Write a synthetic but valid case folder: an RT Ion Plan and one delivery folder per beam.

For demos, tests and benchmarks, where no patient data may be used. The output is
deterministic for given arguments (UIDs derive from the case id and seed), and every
variation a test needs is a keyword, so a test writes a good case and breaks a copy.
The clinic's interpreter reads it as it reads a real export (standins/machine_logs.py):
the SETUP field's control points carry NominalBeamEnergy and CumulativeMetersetWeight,
the machine logs use the room's calibration, and a LINE-scanning plan's spots come from
its logs alone (raster lines), as in a real line-scanning delivery.

Layout written:
    <parent>/<case id>/RP.<sop uid>.dcm     RT Ion Plan: optional SETUP beam 1, then treatment beams
    <parent>/<case id>/<irradiation time>/  per treatment beam and fraction: PlanInfo.txt,
                                            PlanRange.txt, one .ptn + .mgn pair per energy layer
    <parent>/<case id>/_CASE_READY           written last
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from config.settings import DEFAULT_READY_MARKER
from standins.machine_logs import CALIBRATIONS, RANGE_FACTORS, encode, room_of
from standins.pencil_beam import COUNTS_PER_MU
from tasks.casefolder.deliveries import PLANRANGE_HEADER
from tasks.casefolder.plan import RT_ION_PLAN_SOP_CLASS

SCAN_MODES = ("MODULATED", "LINE")
DEFAULT_GANTRY_ANGLES = (0.0, 90.0, 270.0, 180.0, 45.0, 315.0, 135.0, 225.0)
DEFAULT_SPOTS_PER_LAYER = 49  # a 7 x 7 grid at 5 mm: a 3 cm square target
SPOT_SPACING_MM = 5.0
SPOT_SIZE_MM = 6.0
MAX_ENERGY_MEV = 160.0
MIN_ENERGY_MEV = 70.0
MAX_LAYER_STEP_MEV = 5.0
FIRST_IRRADIATION = datetime(2025, 4, 24, 1, 44, 8)
MINUTES_BETWEEN_FIELDS = 4
PTN_BEAM_ON = 50000  # BeamOnOff of a sample with the beam on (the interpreter does not read it)
PTN_BEAM_OFF = 1000
PTN_SPOT_SIZE = 800  # RawXSize, RawYSize (not read)
LINE_STEP_MM = 0.6  # a line-scanning sample every 0.6 mm along the line
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class _TreatmentBeam:
    number: int
    field: int  # 1-based among treatment beams, as in the beam name
    name: str
    gantry_angle: float
    energies: tuple[float, ...]
    spots: tuple[tuple[float, float], ...]
    weights: np.ndarray  # (layers, spots) meterset weights
    meterset: float  # MU
    scan_mode: str  # MODULATED: spots in the plan and the logs; LINE: lines in the logs only

    @property
    def cumulative(self) -> list[float]:
        """CumulativeMetersetWeight at the start of each layer and at the end of the beam."""
        return [0.0, *np.cumsum(self.weights.sum(axis=1)).round(4).tolist()]


def default_patient_id(case_id: str) -> str:
    """The case id when it is a plain DICOM identifier, else a stable 8-digit number.

    Case ids may hold spaces, quotes or unicode; a PatientID (and PlanInfo's comma
    separated value) must not, so such cases get a number derived from the id.
    """
    if _SAFE_ID.fullmatch(case_id):
        return case_id
    return f"{zlib.crc32(case_id.encode()) % 10**8:08d}"


def _uid(case_id: str, seed: int, role: str) -> str:
    return generate_uid(entropy_srcs=[case_id, str(seed), role])


def _ds(value: float) -> str:
    """A Decimal String value that always fits DICOM's 16 characters."""
    return f"{value:.4f}"


def _spot_grid(count: int) -> tuple[tuple[float, float], ...]:
    """`count` spot positions (mm) on a square grid centred on the isocentre, row by row."""
    side = math.ceil(math.sqrt(count))
    offsets = [(i - (side - 1) / 2) * SPOT_SPACING_MM for i in range(side)]
    return tuple((x, y) for y in offsets for x in offsets)[:count]


def _energies(field: int, layers: int) -> tuple[float, ...]:
    """Decreasing layer energies (MeV) within the clinical range, a little lower per field."""
    top = MAX_ENERGY_MEV - 10.0 * ((field - 1) % 8)
    step = min(MAX_LAYER_STEP_MEV, (top - MIN_ENERGY_MEV) / max(layers - 1, 1))
    return tuple(round(top - layer * step, 2) for layer in range(layers))


def _treatment_beams(
    count: int, first_number: int, layers: int, spots: int, angles: Sequence[float], seed: int, scan_mode: str
) -> list[_TreatmentBeam]:
    rng = np.random.default_rng(seed)
    grid = _spot_grid(spots)
    beams = []
    for field, angle in enumerate(angles[:count], start=1):
        beams.append(
            _TreatmentBeam(
                number=first_number + field - 1,
                field=field,
                name=f"{field}G{angle:03.0f}:TX",
                gantry_angle=float(angle),
                energies=_energies(field, layers),
                spots=grid,
                weights=rng.uniform(0.05, 0.5, size=(layers, spots)).round(4),
                meterset=round(float(rng.uniform(40.0, 120.0)), 4),
                scan_mode=scan_mode,
            )
        )
    return beams


def _control_point(beam: _TreatmentBeam, index: int, scan_mode: str) -> Dataset:
    """Control point `index`: layer index // 2; the first of a pair carries the weights."""
    layer, closing = divmod(index, 2)
    point = Dataset()
    point.ControlPointIndex = index
    point.NominalBeamEnergy = _ds(beam.energies[layer])
    if index == 0:  # DICOM requires these only where they are first given or change
        point.GantryAngle = _ds(beam.gantry_angle)
        point.GantryRotationDirection = "NONE"
        point.BeamLimitingDeviceAngle = "0"
        point.BeamLimitingDeviceRotationDirection = "NONE"
        point.PatientSupportAngle = "0"
        point.PatientSupportRotationDirection = "NONE"
        point.IsocenterPosition = ["0", "0", "0"]
        point.SnoutPosition = 300.0
    if scan_mode == "MODULATED":
        point.ScanSpotTuneID = "Spot1"
        point.NumberOfScanSpotPositions = len(beam.spots)
        point.ScanSpotPositionMap = [c for spot in beam.spots for c in spot]
        point.ScanSpotMetersetWeights = [0.0] * len(beam.spots) if closing else beam.weights[layer].tolist()
        point.ScanningSpotSize = [SPOT_SIZE_MM, SPOT_SIZE_MM]
        point.NumberOfPaintings = 1
    point.CumulativeMetersetWeight = _ds(beam.cumulative[layer + closing])
    return point


def _common_beam(number: int, name: str, machine: str) -> Dataset:
    beam = Dataset()
    beam.BeamNumber = number
    beam.BeamName = name
    beam.BeamType = "STATIC"
    beam.TreatmentMachineName = machine
    beam.Manufacturer = "MQI stand-in"
    beam.PrimaryDosimeterUnit = "MU"
    beam.PatientSupportType = "TABLE"
    beam.ReferencedPatientSetupNumber = 1
    for keyword in (
        "NumberOfWedges",
        "NumberOfCompensators",
        "NumberOfBoli",
        "NumberOfBlocks",
        "NumberOfRangeShifters",
        "NumberOfLateralSpreadingDevices",
        "NumberOfRangeModulators",
    ):
        setattr(beam, keyword, 0)
    return beam


def _ion_beam(beam: _TreatmentBeam, machine: str, scan_mode: str) -> Dataset:
    item = _common_beam(beam.number, beam.name, machine)
    item.BeamDescription = f"Field {beam.field}"
    item.RadiationType = "PROTON"
    item.TreatmentDeliveryType = "TREATMENT"
    item.ScanMode = scan_mode
    item.VirtualSourceAxisDistances = [2000.0, 2000.0]
    item.FinalCumulativeMetersetWeight = _ds(beam.cumulative[-1])
    points = 2 * len(beam.energies)
    item.NumberOfControlPoints = points
    item.IonControlPointSequence = DicomSequence(
        [_control_point(beam, index, scan_mode) for index in range(points)]
    )
    return item


def _setup_beam(machine: str) -> Dataset:
    """Beam 1 of the clinic's real plan: a photon setup field with no meterset.

    As in a real export, its two control points carry NominalBeamEnergy 0 and
    CumulativeMetersetWeight 0 then 1 (the clinic's interpreter requires both in every one).
    """
    item = _common_beam(1, "SETUP", machine)
    item.BeamDescription = "Site Setup"
    item.RadiationType = "PHOTON"
    item.TreatmentDeliveryType = "SETUP"
    item.NumberOfControlPoints = 2
    points = []
    for index in range(2):
        point = Dataset()
        point.ControlPointIndex = index
        point.NominalBeamEnergy = "0"
        if index == 0:
            point.GantryAngle = "0"
            point.IsocenterPosition = ["0", "0", "0"]
        point.CumulativeMetersetWeight = str(index)
        points.append(point)
    item.IonControlPointSequence = DicomSequence(points)
    return item


def _plan(
    case_id: str,
    seed: int,
    patient_id: str,
    machine: str,
    scan_mode: str,
    beams: list[_TreatmentBeam],
    setup_beam: bool,
) -> Dataset:
    sop_uid = _uid(case_id, seed, "plan")
    plan = Dataset()
    plan.file_meta = FileMetaDataset()
    plan.file_meta.MediaStorageSOPClassUID = RT_ION_PLAN_SOP_CLASS
    plan.file_meta.MediaStorageSOPInstanceUID = sop_uid
    plan.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plan.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    plan.SpecificCharacterSet = "ISO_IR 192"
    date, time = FIRST_IRRADIATION.strftime("%Y%m%d"), "120000"
    plan.InstanceCreationDate, plan.InstanceCreationTime = date, time
    plan.SOPClassUID = RT_ION_PLAN_SOP_CLASS
    plan.SOPInstanceUID = sop_uid
    plan.StudyDate, plan.StudyTime = date, time
    plan.AccessionNumber = ""
    plan.Modality = "RTPLAN"
    plan.Manufacturer = "MQI stand-in"
    plan.ReferringPhysicianName = ""
    plan.PatientName = "SYNTHETIC^CASE"
    plan.PatientID = patient_id
    plan.PatientBirthDate = ""
    plan.PatientSex = "O"
    plan.StudyInstanceUID = _uid(case_id, seed, "study")
    plan.SeriesInstanceUID = _uid(case_id, seed, "series")
    plan.StudyID = "1"
    plan.SeriesNumber = 1
    plan.InstanceNumber = 1
    plan.FrameOfReferenceUID = _uid(case_id, seed, "frame of reference")
    plan.PositionReferenceIndicator = ""
    plan.RTPlanLabel = "MQI SAMPLE"
    plan.RTPlanName = "Synthetic plan"
    plan.RTPlanDate, plan.RTPlanTime = date, time
    plan.RTPlanGeometry = "PATIENT"
    plan.ApprovalStatus = "APPROVED"

    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = "HFS"
    plan.PatientSetupSequence = DicomSequence([setup])

    references = []
    if setup_beam:
        ref = Dataset()
        ref.ReferencedBeamNumber = 1  # a setup field carries no BeamMeterset
        references.append(ref)
    for beam in beams:
        ref = Dataset()
        ref.ReferencedBeamNumber = beam.number
        ref.BeamMeterset = _ds(beam.meterset)
        references.append(ref)
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = 30
    group.NumberOfBeams = len(references)
    group.NumberOfBrachyApplicationSetups = 0
    group.ReferencedBeamSequence = DicomSequence(references)
    plan.FractionGroupSequence = DicomSequence([group])

    ion_beams = [_setup_beam(machine)] if setup_beam else []
    ion_beams += [_ion_beam(beam, machine, scan_mode) for beam in beams]
    plan.IonBeamSequence = DicomSequence(ion_beams)
    return plan


def range_code(energy: float) -> int:
    """The monitor range code a layer is delivered with (PlanRange DOSE1_RANGE)."""
    return 3 if energy >= 100.0 else 4


def _spot_counts(beam: _TreatmentBeam, layer: int) -> np.ndarray:
    """Monitor counts per spot of one layer: its MU times the stand-in's counts per MU."""
    mu_per_weight = beam.meterset / beam.cumulative[-1]
    return beam.weights[layer] * mu_per_weight * COUNTS_PER_MU


def _ptn_rows(beam: _TreatmentBeam, layer: int, machine: str) -> list[list[int]]:
    """The layer's samples: Columns RawX, RawY, RawXSize, RawYSize, Dose1, Dose2, LayerNum, BeamOnOff.

    Spot scanning: per spot a beam-off move sample, then two beam-on samples with half its
    counts each. Line scanning: per row of spots a beam-off settle sample, then beam-on samples
    every LINE_STEP_MM along the row, each with its share of the nearest spot's counts.
    Dose1 is the count divided by the layer's monitor range factor, as the machine records it.
    """
    calibration = CALIBRATIONS[room_of(machine) or "G2"]
    factor = RANGE_FACTORS[range_code(beam.energies[layer])]
    counts = _spot_counts(beam, layer)

    def sample(x: float, y: float, count: float, on: bool) -> list[int]:
        raw_x, raw_y = calibration.raw(x, y)
        dose = round(count / factor)
        return [
            raw_x,
            raw_y,
            PTN_SPOT_SIZE,
            PTN_SPOT_SIZE,
            dose,
            dose,
            layer + 1,
            PTN_BEAM_ON if on else PTN_BEAM_OFF,
        ]

    rows = []
    if beam.scan_mode == "MODULATED":
        for (x, y), count in zip(beam.spots, counts, strict=True):
            rows += [sample(x, y, 0, False), sample(x, y, count / 2, True), sample(x, y, count / 2, True)]
        return rows
    by_row: dict[float, list[tuple[float, float]]] = {}
    for (x, y), count in zip(beam.spots, counts, strict=True):
        by_row.setdefault(y, []).append((x, count))
    for y, spots in sorted(by_row.items()):
        xs = np.array([x for x, _ in spots])
        start, stop = xs.min() - SPOT_SPACING_MM / 2, xs.max() + SPOT_SPACING_MM / 2
        path = np.arange(start, stop + 1e-9, LINE_STEP_MM)
        nearest = np.abs(path[:, None] - xs[None, :]).argmin(axis=1)
        per_spot = np.bincount(nearest, minlength=len(xs))
        rows.append(sample(float(path[0]), y, 0, False))
        for x, spot in zip(path, nearest, strict=True):
            rows.append(sample(float(x), y, spots[spot][1] / per_spot[spot], True))
    return rows


def _mgn_rows(beam: _TreatmentBeam, layer: int) -> list[list[int]]:
    """Synthetic magnet records, one per spot (the real .mgn layout is not known; nothing reads it)."""
    return [
        [layer + 1, spot + 1, 32768 + round(x * 100), 32768 + round(y * 100), 0, 0, 0, 0]
        for spot, (x, y) in enumerate(beam.spots)
    ]


def _write_delivery(
    case_dir: Path, beam: _TreatmentBeam, fraction: int, patient_id: str, study_uid: str, machine: str
) -> None:
    irradiated = FIRST_IRRADIATION + timedelta(
        days=fraction, minutes=MINUTES_BETWEEN_FIELDS * (beam.field - 1)
    )
    stamp = f"{irradiated:%Y%m%d%H%M%S}00"
    folder = case_dir / stamp
    folder.mkdir()
    layers = len(beam.energies)
    planinfo = {
        "DICOM_PATIENT_ID": patient_id,
        "DICOM_STUDY_INS_UID": study_uid,
        "DICOM_BEAM_NUMBER": beam.number,
        "TCSC_IRRAD_DATETIME": stamp,
        "TCSC_FIELD_NUMBER": beam.number,
        "START_LAYER_NUMBER": 1,
        "STOP_LAYER_NUMBER": layers,
    }
    (folder / "PlanInfo.txt").write_text("".join(f"{k},{v}\n" for k, v in planinfo.items()))
    rows = [PLANRANGE_HEADER]
    for layer, energy in enumerate(beam.energies):
        name = f"L{layer + 1:03d}"
        (folder / f"{name}.ptn").write_bytes(encode(_ptn_rows(beam, layer, machine)))
        (folder / f"{name}.mgn").write_bytes(encode(_mgn_rows(beam, layer)))
        code = range_code(energy)
        rows.append(
            f"{100000 * (fraction + 1) + 1000 * beam.number + layer + 1},{layer + 1},"
            f"{energy:.2f},{patient_id},{beam.number},{code},{code},"
            f"{code},{code},{name}.ptn,PLAN_{name}.ptn"
        )
    (folder / "PlanRange.txt").write_text("\n".join(rows) + "\n")


def write_sample_case(
    parent: Path,
    case_id: str = "DEMO001",
    *,
    beams: int = 3,
    setup_beam: bool = True,
    layers: int = 6,
    spots_per_layer: int = DEFAULT_SPOTS_PER_LAYER,
    patient_id: str | None = None,
    scan_mode: str = "MODULATED",
    machine: str = "G2",
    ready_marker: str | None = DEFAULT_READY_MARKER,
    gantry_angles: list[float] | None = None,
    seed: int = 0,
    fractions: int = 1,
) -> Path:
    """Write a case folder `parent/case_id` and return it; the ready marker comes last.

    Beam 1 is a SETUP field when `setup_beam`; treatment beams follow, named like
    `1G000:TX`, one at each gantry angle. Each fraction adds one delivery folder per
    treatment beam, a day after the previous one. An existing folder is never touched.
    """
    if scan_mode not in SCAN_MODES:
        raise ValueError(f"scan_mode must be one of {SCAN_MODES}, not {scan_mode!r}")
    angles = list(DEFAULT_GANTRY_ANGLES if gantry_angles is None else gantry_angles)
    if beams < 0 or beams > len(angles):
        raise ValueError(f"beams must be between 0 and {len(angles)} (one gantry angle each)")
    if len(set(angles[:beams])) != beams:
        raise ValueError("treatment beams need distinct gantry angles")
    if layers < 1 or spots_per_layer < 1 or fractions < 1:
        raise ValueError("layers, spots_per_layer and fractions must be at least 1")
    case_dir = Path(parent) / case_id
    case_dir.mkdir(parents=True, exist_ok=False)
    patient = default_patient_id(case_id) if patient_id is None else patient_id
    treatment = _treatment_beams(
        beams, 2 if setup_beam else 1, layers, spots_per_layer, angles, seed, scan_mode
    )
    plan = _plan(case_id, seed, patient, machine, scan_mode, treatment, setup_beam)
    plan.save_as(case_dir / f"RP.{plan.SOPInstanceUID}.dcm", enforce_file_format=True)
    for fraction in range(fractions):
        for beam in treatment:
            _write_delivery(case_dir, beam, fraction, patient, plan.StudyInstanceUID, machine)
    if ready_marker:
        (case_dir / ready_marker).touch()
    return case_dir


def main(argv: list[str] | None = None) -> int:
    """`mqi sample-case DIR ...`: write a synthetic case folder and print its path."""
    parser = argparse.ArgumentParser(
        prog="mqi sample-case", description="Write a synthetic, valid case folder."
    )
    parser.add_argument("dir", type=Path, help="parent folder (e.g. the scan root)")
    parser.add_argument("--case-id", default="DEMO001")
    parser.add_argument("--beams", type=int, default=3, help="treatment beams")
    parser.add_argument("--no-setup-beam", action="store_true", help="omit the SETUP beam")
    parser.add_argument("--layers", type=int, default=6, help="energy layers per beam")
    parser.add_argument("--scan-mode", choices=SCAN_MODES, default="MODULATED")
    parser.add_argument("--no-marker", action="store_true", help="do not write _CASE_READY")
    args = parser.parse_args(argv)
    try:
        case_dir = write_sample_case(
            args.dir,
            args.case_id,
            beams=args.beams,
            setup_beam=not args.no_setup_beam,
            layers=args.layers,
            scan_mode=args.scan_mode,
            ready_marker=None if args.no_marker else DEFAULT_READY_MARKER,
        )
    except ValueError as error:
        parser.error(str(error))
    except FileExistsError:
        print(f"error: {args.dir / args.case_id} already exists", file=sys.stderr)
        return 1
    print(case_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
