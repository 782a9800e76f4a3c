"""Discovery of a case folder: the RT Ion Plan, its treatment beams and one delivery per beam.

Plain code, no Prefect, so the sensor, the case flow and the CLI judge a folder alike.
Folder-name and folder-order heuristics once mapped deliveries to the wrong beams, so
PlanInfo.txt's DICOM_BEAM_NUMBER is the only link from a delivery folder to a beam, and
every disagreement with the plan is reported, all at once, naming the case, the file,
the beam and the field. Nothing in the case folder is ever written.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import pydicom
from pydantic import BaseModel, ConfigDict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

RT_ION_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.8"
DEFAULT_READY_MARKER = "_CASE_READY"
PLANINFO_NAME = "PlanInfo.txt"
PLANRANGE_NAMES = ("PlanRange.txt", "PlanRange.csv")
PLANRANGE_HEADER = (
    "RESULT_ID,LAYER_NO,LAYER_ENERGY,PATIENT_ID,FLD_NO,DOSE1_RANGE,DOSE2_RANGE,"
    "PLAN_DOSE1_RANGE,PLAN_DOSE2_RANGE,SCAN_OUT_FL_NM,PLAN_SCAN_OUT_FL_NM"
)
MACHINE_LOG_SUFFIXES = (".ptn", ".mgn")
PTN_RECORD_BYTES = 16  # 8 big-endian uint16 columns
# Files still being written by the transfer service (and rsync's hidden temporaries).
PARTIAL_SUFFIXES = (".extracting", ".tmp", ".part", ".partial")
ROOM_PATTERN = re.compile(r"G[^0-9]*([12])")
PLANINFO_INTEGER_KEYS = ("DICOM_BEAM_NUMBER", "START_LAYER_NUMBER", "STOP_LAYER_NUMBER")
_UNDEFINED_LENGTH = 0xFFFFFFFF

DeliveryPolicy = Literal["earliest_complete", "latest_complete", "single"]
DELIVERY_POLICIES: tuple[str, ...] = get_args(DeliveryPolicy)


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


class UnreadableDicomError(Exception):
    """A file that claims to be DICOM (preamble or .dcm suffix) but cannot be read whole."""


def csv_dir_name(beam_name: str) -> str:
    """The interpreter's folder name for a beam: the beam name with ':' replaced by '_'."""
    return beam_name.replace(":", "_")


def is_partial(name: str) -> bool:
    """Whether a file or folder name belongs to a transfer still in progress."""
    return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)


def read_dicom_header(path: Path) -> Dataset | None:
    """The DICOM header of `path`; None when the file does not claim to be DICOM.

    A file claims to be DICOM by its preamble or a .dcm suffix; if such a file is
    corrupt or truncated, UnreadableDicomError says why.
    """
    with path.open("rb") as stream:
        head = stream.read(132)
    if head[128:132] != b"DICM" and path.suffix.lower() != ".dcm":
        return None
    if not head:
        raise UnreadableDicomError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings(record=True) as caught:  # pydicom also logs them
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError as error:
        raise UnreadableDicomError(f"not a valid DICOM file ({error})") from None
    except Exception as error:  # a third-party parser on untrusted bytes: any failure means corrupt
        raise UnreadableDicomError(f"corrupt DICOM file ({type(error).__name__}: {error})") from None
    reason = _damage(dataset, path.stat().st_size, [str(w.message) for w in caught])
    if reason is not None:
        raise UnreadableDicomError(reason)
    return dataset


def _damage(dataset: Dataset, size: int, warned: list[str]) -> str | None:
    """Why a dataset pydicom read without error is nevertheless incomplete, if it is.

    pydicom reads a truncated file without complaint: the last element comes back
    short, a cut inside an element header is silently skipped, and an undefined-length
    sequence cut short only warns.
    """
    for message in warned:
        if "end of file" in message.lower():
            return f"truncated DICOM file ({message})"
    end = None
    for element in dataset.elements():
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
            end = None
            continue
        end = element.value_tell + element.length
        if element.value is not None and len(element.value) < element.length:
            return (
                f"truncated DICOM file (element {element.tag} holds {len(element.value)} "
                f"of {element.length} bytes)"
            )
    # Images stop before their pixel data on purpose, so only datasets without rows are checked.
    if end is not None and "Rows" not in dataset and end < size:
        return f"truncated DICOM file ({size - end} stray bytes at the end)"
    # Every composite object has a SOPClassUID; only a DICOMDIR keeps it in the file meta alone.
    if "SOPClassUID" not in dataset and (
        dataset.file_meta.get("MediaStorageSOPClassUID") != MediaStorageDirectoryStorage
    ):
        return "DICOM file without a SOPClassUID (truncated or corrupt)"
    return None


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def name_problem(name: str) -> str | None:
    """Why a folder name cannot name a case, if it cannot.

    A case id becomes a run name, a log line, a folder on the output share and a JSON
    string on the Prefect server: bytes that are not UTF-8 cannot be sent to the server,
    and a control character (a newline) splits log lines and cannot exist on a Windows
    share. Spaces, quotes, shell characters and other unicode are fine: no shell ever sees
    a name.
    """
    for char in name:
        if 0xDC80 <= ord(char) <= 0xDCFF:  # how Python keeps a byte that is not UTF-8
            return f"the folder name is not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x}); rename the folder"
        if unicodedata.category(char) == "Cc":
            return f"the folder name contains a control character (U+{ord(char):04X}); rename the folder"
    return None


def _refusal(entry: Path, root: Path) -> str | None:
    """Why discovery must not open `entry`, if it must not.

    A symbolic link leading out of the case folder would read (and make the tools read)
    files that are not the case's; a named pipe or device blocks or never ends when read.
    """
    try:
        if entry.is_symlink():
            target = os.readlink(entry)
            if not Path(os.path.realpath(entry)).is_relative_to(root):
                return f"symbolic link to {target!r} leads outside the case folder; not followed"
            try:
                mode = entry.stat().st_mode
            except OSError as error:
                return f"symbolic link to {target!r} cannot be followed ({error.strerror})"
        else:
            mode = entry.lstat().st_mode
    except OSError as error:
        return f"cannot read ({error.strerror})"
    kind = next((kind for test, kind in _SPECIAL_FILES if test(mode)), None)
    return None if kind is None else f"is {kind}, not a regular file; not read"


def _listing(folder: Path, root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The entries of `folder` that are safe to read, partial transfers left out, in a stable
    order; and (entry, reason) for each one refused. `root` is the case folder's real path.
    """
    entries, refused = [], []
    for entry in sorted(entry for entry in folder.iterdir() if not is_partial(entry.name)):
        reason = _refusal(entry, root)
        if reason is None:
            entries.append(entry)
        else:
            refused.append((entry, reason))
    return entries, refused


def find_rtplans(case_dir: Path) -> tuple[list[tuple[Path, Dataset]], list[tuple[Path, str]]]:
    """RTPLAN headers in the case folder or one level below, found by Modality, not by name.

    Returns the plans, and (path, reason) for each file or folder that could not be read
    or was refused (see `_refusal`). These two levels are all that discovery reads, so
    this is where refused entries are reported.
    """
    plans: list[tuple[Path, Dataset]] = []
    errors: list[tuple[Path, str]] = []
    root = Path(os.path.realpath(case_dir))

    def scan(folder: Path, depth: int) -> None:
        try:
            entries, refused = _listing(folder, root)
        except OSError as error:
            errors.append((folder, f"cannot list folder ({error.strerror})"))
            return
        errors.extend(refused)
        for entry in entries:
            if entry.is_dir():
                if depth == 0:
                    scan(entry, 1)
                continue
            try:
                dataset = read_dicom_header(entry)
            except UnreadableDicomError as error:
                errors.append((entry, str(error)))
                continue
            except OSError as error:
                errors.append((entry, f"cannot read file ({error.strerror})"))
                continue
            if dataset is not None and dataset.get("Modality") == "RTPLAN":
                plans.append((entry, dataset))

    scan(case_dir, 0)
    return plans, errors


@dataclass(frozen=True)
class EnergyLayer:
    """One energy layer of a beam: its energy and its control points (usually two)."""

    energy: float
    control_points: tuple[Dataset, ...]


def energy_layers(ion_beam: Dataset) -> list[EnergyLayer]:
    """Group a beam's control points into energy layers.

    A layer is a run of consecutive control points with the same NominalBeamEnergy; a
    control point without one keeps the previous energy (DICOM only requires it where
    it changes), so this does not assume exactly two control points per layer.
    """
    groups: list[tuple[float, list[Dataset]]] = []
    for index, point in enumerate(ion_beam.get("IonControlPointSequence", [])):
        value = point.get("NominalBeamEnergy")
        if value is None and not groups:
            raise ValueError(f"control point {index} has no NominalBeamEnergy")
        energy = groups[-1][0] if value is None else float(value)
        if groups and groups[-1][0] == energy:
            groups[-1][1].append(point)
        else:
            groups.append((energy, [point]))
    return [EnergyLayer(energy, tuple(points)) for energy, points in groups]


def fraction_metersets(plan: Dataset) -> dict[int, float]:
    """BeamMeterset (MU) per referenced beam number, over all fraction groups."""
    metersets: dict[int, float] = {}
    for group in plan.get("FractionGroupSequence", []):
        for ref in group.get("ReferencedBeamSequence", []):
            number = ref.get("ReferencedBeamNumber")
            meterset = ref.get("BeamMeterset")
            if number is not None and meterset is not None:
                metersets.setdefault(int(number), float(meterset))
    return metersets


def setup_reason(ion_beam: Dataset, meterset: float | None) -> str | None:
    """Why a beam is a setup field rather than a treatment field; None for a treatment field."""
    if str(ion_beam.get("TreatmentDeliveryType", "")).upper() == "SETUP":
        return "setup field (TreatmentDeliveryType SETUP)"
    if str(ion_beam.get("BeamDescription", "")).strip().lower() == "site setup":
        return "setup field (BeamDescription 'Site Setup')"
    if str(ion_beam.get("BeamName", "")).strip().upper() == "SETUP":
        return "setup field (BeamName 'SETUP')"
    if meterset is None:
        return "no meterset (no BeamMeterset in the FractionGroupSequence)"
    if meterset <= 0:
        return f"no meterset (BeamMeterset {meterset:g})"
    return None


def _rel(path: Path, case_dir: Path) -> str:
    return path.relative_to(case_dir).as_posix() if path != case_dir else "."


class _Problems:
    """Problem messages, each prefixed with the case id so it stands alone in any log."""

    def __init__(self, case_id: str) -> None:
        self.case_id = case_id
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"{self.case_id}: {where}: {message}")


@dataclass(frozen=True)
class _PlanBeam:
    number: int
    name: str
    layers: int
    gantry_angle: float
    isocenter_mm: tuple[float, float, float]
    scan_mode: str
    meterset: float
    machine: str


@dataclass(frozen=True)
class _Plan:
    path: Path
    patient_id: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uid: str
    label: str
    treatment: dict[int, _PlanBeam]
    excluded: dict[int, ExcludedBeam]
    unusable: frozenset[int]  # beam numbers whose own problems are already reported


@dataclass(frozen=True)
class _DeliveryRecord:
    """A parsed delivery folder before it is matched to the plan."""

    delivery: Delivery
    start_layer: int
    stop_layer: int
    planrange_name: str

    def layer_mismatches(self, plan_layers: int) -> list[str]:
        """Why this delivery does not cover the beam's layers; empty when it is complete."""
        reasons = []
        if self.delivery.layers != plan_layers:
            reasons.append(
                f"{self.planrange_name} has {self.delivery.layers} layer rows, "
                f"the plan has {plan_layers} energy layers"
            )
        span = self.stop_layer - self.start_layer + 1
        if span != plan_layers:
            reasons.append(
                f"{PLANINFO_NAME} START_LAYER_NUMBER {self.start_layer} .. STOP_LAYER_NUMBER "
                f"{self.stop_layer} is {span} layers, the plan has {plan_layers} energy layers"
            )
        return reasons


def _read_beam(
    ion_beam: Dataset, number: int, metersets: dict[int, float], where: str, problems: _Problems
) -> _PlanBeam | ExcludedBeam | None:
    """One IonBeamSequence item as a treatment or excluded beam; None (with a problem) if unusable."""
    name = str(ion_beam.get("BeamName", "") or "").strip()
    reason = setup_reason(ion_beam, metersets.get(number))
    if reason is not None:
        return ExcludedBeam(number=number, name=name, reason=reason)
    beam_where = f"{where} beam {number} {name!r}"
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        problems.add(beam_where, "BeamName is empty or cannot be a folder name")
        return None
    radiation = str(ion_beam.get("RadiationType", "") or "").strip().upper()
    if radiation not in ("", "PROTON"):
        problems.add(beam_where, f"RadiationType {radiation}: only proton beams can be recalculated")
        return None
    try:
        layers = energy_layers(ion_beam)
    except ValueError as error:
        problems.add(beam_where, f"IonControlPointSequence: {error}")
        return None
    if not layers:
        problems.add(beam_where, "IonControlPointSequence has no control points")
        return None
    angle = layers[0].control_points[0].get("GantryAngle")
    if angle is None:
        problems.add(beam_where, "first control point has no GantryAngle")
        return None
    isocenter = layers[0].control_points[0].get("IsocenterPosition")
    if isocenter is None or len(isocenter) != 3:
        problems.add(beam_where, "first control point has no IsocenterPosition (x, y, z)")
        return None
    return _PlanBeam(
        number=number,
        name=name,
        layers=len(layers),
        gantry_angle=float(angle),
        isocenter_mm=tuple(float(v) for v in isocenter),
        scan_mode=str(ion_beam.get("ScanMode", "") or ""),
        meterset=metersets[number],
        machine=str(ion_beam.get("TreatmentMachineName", "") or "").strip(),
    )


def _read_plan(path: Path, plan: Dataset, case_dir: Path, problems: _Problems) -> _Plan | None:
    """The plan's identity and beams, problems reported; None when it is not an RT Ion Plan.

    A plan with problems is still returned so the delivery folders are checked against
    it too: one inspection lists everything that must be fixed.
    """
    where = _rel(path, case_dir)
    sop_class = str(plan.get("SOPClassUID", ""))
    if sop_class != RT_ION_PLAN_SOP_CLASS:
        name = getattr(plan.get("SOPClassUID"), "name", "unknown")
        problems.add(where, f"not an RT Ion Plan (SOPClassUID {sop_class or 'missing'}, {name})")
        return None
    identity: dict[str, str] = {}
    for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        identity[keyword] = str(plan.get(keyword, "") or "").strip()
        if not identity[keyword]:
            problems.add(where, f"{keyword} is missing")
    metersets = fraction_metersets(plan)
    treatment: dict[int, _PlanBeam] = {}
    excluded: dict[int, ExcludedBeam] = {}
    unusable: set[int] = set()
    ion_beams = plan.get("IonBeamSequence") or []
    if not ion_beams:
        problems.add(where, "IonBeamSequence is missing or empty")
    for index, ion_beam in enumerate(ion_beams):
        if ion_beam.get("BeamNumber") is None:
            problems.add(where, f"IonBeamSequence item {index + 1} has no BeamNumber")
            continue
        number = int(ion_beam.BeamNumber)
        if number in treatment or number in excluded or number in unusable:
            problems.add(where, f"BeamNumber {number} appears twice in IonBeamSequence")
            continue
        beam = _read_beam(ion_beam, number, metersets, where, problems)
        if beam is None:
            unusable.add(number)
        elif isinstance(beam, ExcludedBeam):
            excluded[number] = beam
        else:
            treatment[number] = beam
    if ion_beams and not treatment and not unusable:
        problems.add(where, "no treatment beams (every beam is a setup field or has no meterset)")
    machines = sorted({beam.machine for beam in treatment.values()})
    if len(machines) > 1:
        problems.add(where, f"treatment beams name different machines: {', '.join(machines)}")
    return _Plan(
        path=path,
        patient_id=identity["PatientID"],
        study_instance_uid=identity["StudyInstanceUID"],
        frame_of_reference_uid=identity["FrameOfReferenceUID"],
        sop_instance_uid=identity["SOPInstanceUID"],
        label=str(plan.get("RTPlanLabel", "") or ""),
        treatment=treatment,
        excluded=excluded,
        unusable=frozenset(unusable),
    )


def _decode(data: bytes) -> str:
    """Text of a machine-written file: UTF-8 (BOM tolerated), else Latin-1, never an error."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _find_named(entries: Iterable[Path], wanted: str) -> Path | None:
    """The entry called `wanted`, ignoring case (the files come from Windows machines)."""
    return next((path for path in entries if path.name.lower() == wanted.lower()), None)


def _parse_planinfo(text: str, where: str, problems: _Problems) -> dict[str, str] | None:
    """KEY,VALUE lines; None (with a problem per bad line) when any line is unparsable."""
    values: dict[str, str] = {}
    ok = True
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        key, comma, value = line.partition(",")
        key = key.strip()
        if not comma or not key:
            problems.add(f"{where} line {number}", f"not a KEY,VALUE line: {line[:80]!r}")
            ok = False
        elif key in values:
            problems.add(f"{where} line {number}", f"{key} appears twice")
            ok = False
        else:
            values[key] = value.strip()
    return values if ok else None


def _planinfo_numbers(values: dict[str, str], where: str, problems: _Problems) -> dict[str, int]:
    """The integer PlanInfo fields that are present and valid; each bad one is a problem."""
    numbers: dict[str, int] = {}
    for key in PLANINFO_INTEGER_KEYS:
        if key not in values:
            problems.add(where, f"{key} is missing")
            continue
        try:
            numbers[key] = int(values[key])
        except ValueError:
            problems.add(where, f"{key} is not an integer: {values[key][:40]!r}")
    return numbers


def _planrange_rows(path: Path, where: str, problems: _Problems) -> int | None:
    """Number of layer rows in PlanRange; None (with a problem) for a bad header or row."""
    lines = [line.strip() for line in _decode(path.read_bytes()).splitlines()]
    lines = [line for line in lines if line]
    if not lines or lines[0].replace(" ", "") != PLANRANGE_HEADER:
        found = repr(lines[0][:120]) if lines else "an empty file"
        problems.add(where, f"header is not {PLANRANGE_HEADER!r} (found {found})")
        return None
    columns = PLANRANGE_HEADER.count(",") + 1
    bad = [row for row, line in enumerate(lines[1:], start=1) if line.count(",") + 1 != columns]
    if bad:
        problems.add(where, f"layer rows {bad[:5]} do not have {columns} fields")
        return None
    return len(lines) - 1


def _read_delivery(
    folder: Path, planinfo: Path, entries: list[Path], problems: _Problems
) -> tuple[_DeliveryRecord | None, int | None]:
    """A delivery folder's PlanInfo and PlanRange.

    Returns the record (None, with problems, when the folder is unusable) and the beam
    number its PlanInfo names, when readable, so a broken folder still counts as the
    beam's delivery in the messages.
    """
    where = f"delivery folder {folder.name!r}"
    before = len(problems.messages)
    planrange = next(filter(None, (_find_named(entries, name) for name in PLANRANGE_NAMES)), None)
    try:
        values = _parse_planinfo(_decode(planinfo.read_bytes()), f"{where} {planinfo.name}", problems)
        rows = (
            None if planrange is None else _planrange_rows(planrange, f"{where} {planrange.name}", problems)
        )
    except OSError as error:
        problems.add(where, f"cannot read {error.filename} ({error.strerror})")
        return None, None
    numbers = {} if values is None else _planinfo_numbers(values, f"{where} {planinfo.name}", problems)
    if planrange is None:
        problems.add(where, f"no {' or '.join(PLANRANGE_NAMES)}")
    beam_number = numbers.get("DICOM_BEAM_NUMBER")
    if values is not None and "DICOM_PATIENT_ID" not in values:
        problems.add(f"{where} {planinfo.name}", "DICOM_PATIENT_ID is missing")
    _check_machine_logs(entries, where if beam_number is None else f"{where} (beam {beam_number})", problems)
    if len(problems.messages) > before or values is None or rows is None or planrange is None:
        return None, beam_number
    delivery = Delivery(
        folder=folder.name,
        path=str(folder),
        beam_number=numbers["DICOM_BEAM_NUMBER"],
        irradiation_time=values.get("TCSC_IRRAD_DATETIME") or folder.name,
        layers=rows,
        patient_id=values["DICOM_PATIENT_ID"],
    )
    record = _DeliveryRecord(
        delivery=delivery,
        start_layer=numbers["START_LAYER_NUMBER"],
        stop_layer=numbers["STOP_LAYER_NUMBER"],
        planrange_name=planrange.name,
    )
    return record, beam_number


def _check_machine_logs(entries: list[Path], where: str, problems: _Problems) -> None:
    """Each .ptn/.mgn file must be readable and hold data, a .ptn whole records.

    Discovery does not parse the logs (the interpreter does), but an empty, cut or
    unreadable log must fail the case here, naming the file, not deep in the interpreter.
    """
    for path in entries:
        suffix = path.suffix.lower()
        if suffix not in MACHINE_LOG_SUFFIXES:
            continue
        try:
            with path.open("rb") as stream:
                size = os.fstat(stream.fileno()).st_size
        except OSError as error:
            problems.add(f"{where} {path.name}", f"cannot read ({error.strerror})")
            continue
        if size == 0:
            problems.add(f"{where} {path.name}", "empty file (0 bytes)")
        elif suffix == ".ptn" and size % PTN_RECORD_BYTES:
            problems.add(
                f"{where} {path.name}",
                f"{size} bytes is not a whole number of {PTN_RECORD_BYTES}-byte records "
                "(8 big-endian uint16 columns): cut short?",
            )


def _delivery_folders(case_dir: Path, root: Path) -> Iterator[tuple[Path, list[Path]]]:
    """(folder, its entries) per subfolder holding a PlanInfo.txt or machine log files.

    Refused entries and folders that cannot be listed are skipped here: find_rtplans,
    which reads the same two levels, reports them.
    """
    for entry in _listing(case_dir, root)[0]:
        if not entry.is_dir():
            continue
        try:
            entries = _listing(entry, root)[0]
        except OSError:
            continue
        if _find_named(entries, PLANINFO_NAME) or any(
            path.suffix.lower() in MACHINE_LOG_SUFFIXES for path in entries
        ):
            yield entry, entries


def _choose(
    beam: _PlanBeam, records: list[_DeliveryRecord], policy: DeliveryPolicy, problems: _Problems
) -> Delivery | None:
    """The delivery of `beam` that the policy names; None (with problems) when there is none."""
    label = f"beam {beam.number} {beam.name!r}"
    if policy == "single" and len(records) > 1:
        folders = ", ".join(repr(record.delivery.folder) for record in records)
        problems.add(label, f"{len(records)} delivery folders ({folders}); policy 'single' allows one")
        return None
    ordered = sorted(records, key=lambda r: (r.delivery.irradiation_time, r.delivery.folder))
    if policy == "latest_complete":
        ordered.reverse()
    for record in ordered:
        if not record.layer_mismatches(beam.layers):
            return record.delivery
    for record in ordered:
        for reason in record.layer_mismatches(beam.layers):
            problems.add(f"delivery folder {record.delivery.folder!r} ({label})", reason)
    return None


def _match(
    plan: _Plan,
    records: list[_DeliveryRecord],
    claimed: set[int],
    policy: DeliveryPolicy,
    problems: _Problems,
) -> tuple[list[Beam], list[int]]:
    """Map deliveries to beams by DICOM_BEAM_NUMBER and pick one per beam by policy.

    Returns the matched beams and the treatment beams that have no delivery folder.
    `claimed` holds the beam numbers named by delivery folders that had problems of
    their own, so such a beam is not also reported as having no delivery folder.
    """
    by_beam: dict[int, list[_DeliveryRecord]] = {}
    for record in records:
        delivery = record.delivery
        number = delivery.beam_number
        where = f"delivery folder {delivery.folder!r} {PLANINFO_NAME}"
        if number in plan.unusable:
            continue
        if plan.patient_id and delivery.patient_id != plan.patient_id:
            problems.add(
                where,
                f"DICOM_PATIENT_ID {delivery.patient_id!r} (beam {number}) differs from the "
                f"plan's PatientID {plan.patient_id!r}",
            )
        if number in plan.excluded:
            beam = plan.excluded[number]
            problems.add(
                where,
                f"DICOM_BEAM_NUMBER {number} is {beam.name!r}, which is not treated "
                f"({beam.reason}): extra delivery folder",
            )
        elif number not in plan.treatment:
            problems.add(
                where, f"DICOM_BEAM_NUMBER {number} is not a beam of the plan: extra delivery folder"
            )
        else:
            by_beam.setdefault(number, []).append(record)
    beams = []
    missing = []
    for number, plan_beam in sorted(plan.treatment.items()):
        candidates = by_beam.get(number, [])
        if not candidates and number not in claimed:
            missing.append(number)
            problems.add(
                f"beam {number} {plan_beam.name!r}",
                f"no delivery folder (no {PLANINFO_NAME} with DICOM_BEAM_NUMBER {number})",
            )
        delivery = _choose(plan_beam, candidates, policy, problems) if candidates else None
        if delivery is not None:
            beams.append(
                Beam(
                    number=number,
                    name=plan_beam.name,
                    gantry_angle=plan_beam.gantry_angle,
                    isocenter_mm=plan_beam.isocenter_mm,
                    layers=plan_beam.layers,
                    scan_mode=plan_beam.scan_mode,
                    meterset=plan_beam.meterset,
                    delivery=delivery,
                )
            )
    return beams, missing


def _inspect_folder(
    case_dir: Path, policy: DeliveryPolicy, problems: _Problems
) -> tuple[_Plan | None, list[Beam], list[int]]:
    """Find the plan and the deliveries and match them; problems are collected, not raised.

    Returns the plan, the matched beams and the treatment beams without a delivery folder.
    """
    found, unreadable = find_rtplans(case_dir)
    for path, reason in unreadable:
        problems.add(_rel(path, case_dir), reason)
    plan = None
    if not found:
        problems.add(".", "no RTPLAN found (DICOM headers read in the case folder and one level below)")
    elif len(found) > 1:
        names = ", ".join(_rel(path, case_dir) for path, _ in found)
        problems.add(".", f"{len(found)} RTPLAN files, expected exactly one: {names}")
    else:
        path, dataset = found[0]
        try:
            plan = _read_plan(path, dataset, case_dir, problems)
        except Exception as error:  # malformed values in an untrusted plan surface on access
            problems.add(_rel(path, case_dir), f"cannot read the plan ({type(error).__name__}: {error})")
    records: list[_DeliveryRecord] = []
    claimed: set[int] = set()
    folders = list(_delivery_folders(case_dir, Path(os.path.realpath(case_dir))))
    for folder, entries in folders:
        planinfo = _find_named(entries, PLANINFO_NAME)
        if planinfo is None:
            # Guessing its beam from the folder name or order is what mapped deliveries wrongly before.
            problems.add(
                f"delivery folder {folder.name!r}",
                f"holds machine log files (.ptn/.mgn) but no {PLANINFO_NAME}",
            )
            continue
        record, beam_number = _read_delivery(folder, planinfo, entries, problems)
        if record is not None:
            records.append(record)
        elif beam_number is not None:
            claimed.add(beam_number)
    if plan is None:
        return None, [], []
    beams, missing = _match(plan, records, claimed, policy, problems)
    # Only a case with fewer delivery folders than treatment beams may still be arriving;
    # in any other the folder of a missing beam is there but broken, and that is reported.
    arriving = len(folders) < len(plan.treatment) + len(plan.unusable)
    return plan, beams, missing if arriving else []


def inspect_case(
    case_dir: Path | str,
    *,
    ready_marker: str = DEFAULT_READY_MARKER,
    delivery_policy: DeliveryPolicy = "earliest_complete",
) -> Inspection:
    """Inspect a case folder without raising for anything wrong in it.

    Every problem is collected so that one look tells the physicist all that must be
    fixed. The readiness marker is reported in `ready`, never as a problem.
    """
    if delivery_policy not in DELIVERY_POLICIES:
        raise ValueError(f"delivery_policy must be one of {DELIVERY_POLICIES}, not {delivery_policy!r}")
    case_path = Path(os.path.abspath(case_dir))
    problems = _Problems(case_path.name)
    plan: _Plan | None = None
    beams: list[Beam] = []
    missing: list[int] = []
    ready = False
    name = name_problem(case_path.name)
    if name is not None:
        problems.add(".", name)
    try:
        ready = (case_path / ready_marker).is_file()
        if not case_path.is_dir():
            problems.add(str(case_path), "is not a folder")
        elif all(entry.name == ready_marker for entry in case_path.iterdir()):
            problems.add(".", "the case folder is empty (no RTPLAN, no delivery folders)")
        else:
            plan, beams, missing = _inspect_folder(case_path, delivery_policy, problems)
    except OSError as error:  # a folder vanishing or locked mid-scan: report it, never raise
        problems.add(str(error.filename or case_path), f"cannot read ({error.strerror})")
    excluded = sorted(plan.excluded.values(), key=lambda beam: beam.number) if plan else []
    case = None
    if plan is not None and not problems.messages:
        machine = next(iter(plan.treatment.values())).machine
        room = ROOM_PATTERN.search(machine)
        case = Case(
            case_id=case_path.name,
            case_dir=str(case_path),
            plan_path=str(plan.path),
            patient_id=plan.patient_id,
            study_instance_uid=plan.study_instance_uid,
            frame_of_reference_uid=plan.frame_of_reference_uid,
            plan_sop_instance_uid=plan.sop_instance_uid,
            plan_label=plan.label,
            machine=machine,
            room=int(room.group(1)) if room else None,
            beams=beams,
            excluded=excluded,
        )
    return Inspection(
        case_id=case_path.name,
        case_dir=str(case_path),
        ready=ready,
        plan_path=str(plan.path) if plan else None,
        beams=beams,
        excluded=excluded,
        problems=problems.messages,
        case=case,
        missing_deliveries=missing,
    )


def discover_case(
    case_dir: Path | str,
    *,
    ready_marker: str | None = None,
    delivery_policy: DeliveryPolicy = "earliest_complete",
) -> Case:
    """The case in `case_dir`, or CaseError listing every problem.

    With `ready_marker` given, a missing marker is a problem too, so a case flow started
    by hand never runs a half-copied folder; None skips the check for sources that write
    no marker (their readiness comes from a quiet period).
    """
    inspection = inspect_case(
        case_dir, ready_marker=ready_marker or DEFAULT_READY_MARKER, delivery_policy=delivery_policy
    )
    problems = list(inspection.problems)
    if ready_marker and not inspection.ready:
        problems.append(f"{inspection.case_id}: {ready_marker}: readiness marker is missing")
    if problems or inspection.case is None:
        raise CaseError(inspection.case_id, problems)
    return inspection.case
