"""Delivery folders: PlanInfo.txt, PlanRange and the machine log files of one delivered field.

Discovery does not parse the machine logs (the interpreter does); it reads the small text
files that say which beam a folder delivered, and checks that the logs are whole, so that
an empty, cut or unreadable file fails the case here, naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tasks.casefolder.model import Delivery
from tasks.casefolder.names import safe_listing
from tasks.casefolder.problems import Problems

MACHINE_LOG_SUFFIXES = (".ptn", ".mgn")
PTN_RECORD_BYTES = 16  # 8 big-endian uint16 columns
PLANINFO_NAME = "PlanInfo.txt"
PLANRANGE_NAMES = ("PlanRange.txt", "PlanRange.csv")
PLANRANGE_HEADER = (
    "RESULT_ID,LAYER_NO,LAYER_ENERGY,PATIENT_ID,FLD_NO,DOSE1_RANGE,DOSE2_RANGE,"
    "PLAN_DOSE1_RANGE,PLAN_DOSE2_RANGE,SCAN_OUT_FL_NM,PLAN_SCAN_OUT_FL_NM"
)

PLANINFO_INTEGER_KEYS = ("DICOM_BEAM_NUMBER", "START_LAYER_NUMBER", "STOP_LAYER_NUMBER")
IRRADIATION_KEY = "TCSC_IRRAD_DATETIME"
# The machine's form: YYYYMMDDhhmmss and two digits of hundredths (2025042401440800).
MACHINE_DATETIME = re.compile(r"(\d{14})(\d{2})?")


@dataclass(frozen=True)
class DeliveryRecord:
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


def decode_text(data: bytes) -> str:
    """Text of a machine-written file: UTF-8 (BOM tolerated), else Latin-1, never an error."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def find_named(entries: Iterable[Path], wanted: str) -> Path | None:
    """The entry called `wanted`, ignoring case (the files come from Windows machines)."""
    return next((path for path in entries if path.name.lower() == wanted.lower()), None)


def parse_irradiation_time(value: str) -> datetime | None:
    """An irradiation time in the machine's form (2025042401440800) or ISO form; None if neither.

    Times carrying a time zone are refused: the machine writes local time, and one aware
    time among naive ones could not be ordered.
    """
    machine = MACHINE_DATETIME.fullmatch(value)
    try:
        if machine:
            parsed = datetime.strptime(machine.group(1), "%Y%m%d%H%M%S")
            return parsed.replace(microsecond=int(machine.group(2) or 0) * 10_000)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is None else None


def _irradiation_time(
    values: dict[str, str], lines: dict[str, int], folder: str, where: str, problems: Problems
) -> datetime | None:
    """TCSC_IRRAD_DATETIME parsed (deliveries are ordered by it); without one, the folder name's time."""
    if IRRADIATION_KEY not in values:
        parsed = parse_irradiation_time(folder)
        if parsed is None:
            problems.add(where, f"{IRRADIATION_KEY} is missing (and the folder name is not a date and time)")
        return parsed
    parsed = parse_irradiation_time(values[IRRADIATION_KEY])
    if parsed is None:
        problems.add(
            f"{where} line {lines[IRRADIATION_KEY]}",
            f"{IRRADIATION_KEY} {values[IRRADIATION_KEY][:40]!r} is not a date and time "
            "(expected YYYYMMDDhhmmssff, as the machine writes it, or ISO YYYY-MM-DD hh:mm:ss)",
        )
    return parsed


def _parse_planinfo(
    text: str, where: str, problems: Problems
) -> tuple[dict[str, str], dict[str, int]] | None:
    """KEY,VALUE lines and each key's line number; None (with a problem per bad line) if any is bad."""
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
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
            lines[key] = number
    return (values, lines) if ok else None


def _planinfo_numbers(values: dict[str, str], where: str, problems: Problems) -> dict[str, int]:
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


def _planrange_rows(path: Path, where: str, problems: Problems) -> int | None:
    """Number of layer rows in PlanRange; None (with a problem) for a bad header or row."""
    lines = [line.strip() for line in decode_text(path.read_bytes()).splitlines()]
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


def read_delivery(
    folder: Path, planinfo: Path, entries: list[Path], problems: Problems
) -> tuple[DeliveryRecord | None, int | None]:
    """A delivery folder's PlanInfo and PlanRange.

    Returns the record (None, with problems, when the folder is unusable) and the beam
    number its PlanInfo names, when readable, so a broken folder still counts as the
    beam's delivery in the messages.
    """
    where = f"delivery folder {folder.name!r}"
    before = len(problems.messages)
    planrange = next(filter(None, (find_named(entries, name) for name in PLANRANGE_NAMES)), None)
    try:
        parsed = _parse_planinfo(decode_text(planinfo.read_bytes()), f"{where} {planinfo.name}", problems)
        rows = (
            None if planrange is None else _planrange_rows(planrange, f"{where} {planrange.name}", problems)
        )
    except OSError as error:
        problems.add(where, f"cannot read {error.filename} ({error.strerror})")
        return None, None
    values, lines = parsed if parsed is not None else (None, {})
    numbers = {} if values is None else _planinfo_numbers(values, f"{where} {planinfo.name}", problems)
    irradiated = (
        None
        if values is None
        else _irradiation_time(values, lines, folder.name, f"{where} {planinfo.name}", problems)
    )
    if planrange is None:
        problems.add(where, f"no {' or '.join(PLANRANGE_NAMES)}")
    beam_number = numbers.get("DICOM_BEAM_NUMBER")
    if values is not None and "DICOM_PATIENT_ID" not in values:
        problems.add(f"{where} {planinfo.name}", "DICOM_PATIENT_ID is missing")
    _check_machine_logs(entries, where if beam_number is None else f"{where} (beam {beam_number})", problems)
    unusable = values is None or rows is None or planrange is None or irradiated is None
    if len(problems.messages) > before or unusable:
        return None, beam_number
    delivery = Delivery(
        folder=folder.name,
        path=str(folder),
        beam_number=numbers["DICOM_BEAM_NUMBER"],
        irradiation_time=irradiated,
        layers=rows,
        patient_id=values["DICOM_PATIENT_ID"],
    )
    record = DeliveryRecord(
        delivery=delivery,
        start_layer=numbers["START_LAYER_NUMBER"],
        stop_layer=numbers["STOP_LAYER_NUMBER"],
        planrange_name=planrange.name,
    )
    return record, beam_number


def _check_machine_logs(entries: list[Path], where: str, problems: Problems) -> None:
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


def delivery_folders(case_dir: Path, root: Path) -> Iterator[tuple[Path, list[Path]]]:
    """(folder, its entries) per subfolder holding a PlanInfo.txt or machine log files.

    Refused entries and folders that cannot be listed are skipped here: find_rtplans,
    which reads the same two levels, reports them.
    """
    for entry in safe_listing(case_dir, root)[0]:
        if not entry.is_dir():
            continue
        try:
            entries = safe_listing(entry, root)[0]
        except OSError:
            continue
        if find_named(entries, PLANINFO_NAME) or any(
            path.suffix.lower() in MACHINE_LOG_SUFFIXES for path in entries
        ):
            yield entry, entries
