"""The RT Ion Plan of a case folder: found by its DICOM header, read into treatment and setup beams.

A file is taken for DICOM by its preamble or a .dcm suffix, and one that is truncated or
corrupt is reported as such (pydicom alone reads a cut file without complaint). Setup
fields, beams without a meterset and non-proton beams are told apart here.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

from tasks.casefolder.model import ExcludedBeam
from tasks.casefolder.names import csv_dir_name, safe_listing
from tasks.casefolder.problems import Problems, relative

RT_ION_PLAN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.8"

ROOM_PATTERN = re.compile(r"G[^0-9]*([12])")
_UNDEFINED_LENGTH = 0xFFFFFFFF


class UnreadableDicomError(Exception):
    """A file that claims to be DICOM (preamble or .dcm suffix) but cannot be read whole."""


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


def find_rtplans(case_dir: Path) -> tuple[list[tuple[Path, Dataset]], list[tuple[Path, str]]]:
    """RTPLAN headers in the case folder or one level below, found by Modality, not by name.

    Returns the plans, and (path, reason) for each file or folder that could not be read
    or was refused (see `refusal`). These two levels are all that discovery reads, so
    this is where refused entries are reported.
    """
    plans: list[tuple[Path, Dataset]] = []
    errors: list[tuple[Path, str]] = []
    root = Path(os.path.realpath(case_dir))

    def scan(folder: Path, depth: int) -> None:
        try:
            entries, refused = safe_listing(folder, root)
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


@dataclass(frozen=True)
class PlanBeam:
    number: int
    name: str
    layers: int
    gantry_angle: float
    isocenter_mm: tuple[float, float, float]
    scan_mode: str
    meterset: float
    machine: str
    range_shifters: int
    blocks: int


@dataclass(frozen=True)
class Plan:
    path: Path
    patient_id: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uid: str
    label: str
    treatment: dict[int, PlanBeam]
    excluded: dict[int, ExcludedBeam]
    unusable: frozenset[int]  # beam numbers whose own problems are already reported


def _read_beam(
    ion_beam: Dataset, number: int, metersets: dict[int, float], where: str, problems: Problems
) -> PlanBeam | ExcludedBeam | None:
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
    return PlanBeam(
        number=number,
        name=name,
        layers=len(layers),
        gantry_angle=float(angle),
        isocenter_mm=tuple(float(v) for v in isocenter),
        scan_mode=str(ion_beam.get("ScanMode", "") or ""),
        meterset=metersets[number],
        machine=str(ion_beam.get("TreatmentMachineName", "") or "").strip(),
        range_shifters=int(ion_beam.get("NumberOfRangeShifters") or 0),
        blocks=int(ion_beam.get("NumberOfBlocks") or 0),
    )


def read_plan(path: Path, plan: Dataset, case_dir: Path, problems: Problems) -> Plan | None:
    """The plan's identity and beams, problems reported; None when it is not an RT Ion Plan.

    A plan with problems is still returned so the delivery folders are checked against
    it too: one inspection lists everything that must be fixed.
    """
    where = relative(path, case_dir)
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
    treatment: dict[int, PlanBeam] = {}
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
    folders: dict[str, list[str]] = {}
    for beam in treatment.values():
        folders.setdefault(csv_dir_name(beam.name), []).append(repr(beam.name))
    for folder, names in sorted(folders.items()):
        if len(names) > 1:
            problems.add(
                where,
                f"beams {', '.join(names)} would share the interpreter's folder {folder!r} "
                "(it keeps only letters, digits, '_' and '-' of a beam name); rename one",
            )
    return Plan(
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
