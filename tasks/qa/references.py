"""Finding each beam's QA reference in the case folder (and a configured reference folder).

A TPS dose belongs to a beam when it is an RTDOSE of summation type BEAM that references
the case's plan (ReferencedRTPlanSequence SOP Instance UID) and the beam's number
(ReferencedBeamNumber). An OCTAVIUS measurement (`.mcc`, the PTW export) carries no plan
or beam number: it belongs to the beam whose name its file name starts with, up to the
first `_` ("1G_020mm.mcc" and "1G240_2cm.mcc" both belong to beam "1G240:TX", field 1 at
gantry 240), as the clinic names them. Nothing here is ever written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from tasks.casefolder.names import safe_listing
from tasks.casefolder.plan import UnreadableDicomError, read_dicom_header
from tasks.dose.read import plan_references, referenced_beam_number
from tasks.qa.model import Reference

_FIELD_TOKEN = re.compile(r"\d+G", re.IGNORECASE)


def _files(folder: Path) -> Iterable[Path]:
    """Regular files in `folder` and one level below, partial transfers and unsafe entries left out."""
    root = Path(os.path.realpath(folder))
    try:
        entries, _ = safe_listing(folder, root)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir():
            try:
                below, _ = safe_listing(entry, root)
            except OSError:
                continue
            yield from (path for path in below if path.is_file())
        elif entry.is_file():
            yield entry


def _tps_beam(path: Path, plan_uid: str) -> int | None:
    """The beam number of a TPS beam dose of this plan in `path`, or None if it is none."""
    try:
        header = read_dicom_header(path)
    except (UnreadableDicomError, OSError):
        return None
    if header is None or header.get("Modality") != "RTDOSE" or header.get("DoseSummationType") != "BEAM":
        return None
    plans = [str(ref.get("ReferencedSOPInstanceUID", "")) for ref in plan_references(header)]
    if plan_uid not in plans:
        return None
    return referenced_beam_number(header)


def measurement_beam(path: Path, beams: dict[int, str]) -> int | None:
    """The beam an `.mcc` file belongs to by its name, or None when no beam (or several) match."""
    token = path.stem.split("_", 1)[0].casefold()
    if not token:
        return None
    matches = []
    for number, name in beams.items():
        field = name.split(":", 1)[0].casefold()
        if field == token or (_FIELD_TOKEN.fullmatch(token) and field.startswith(token)):
            matches.append(number)
    return matches[0] if len(matches) == 1 else None


def find_references(
    folders: Iterable[Path], plan_uid: str, beams: dict[int, str]
) -> dict[int, list[Reference]]:
    """Every reference of the case's treatment beams (`beams`: number -> name), by beam number."""
    found: dict[int, list[Reference]] = {number: [] for number in beams}
    seen: set[Path] = set()
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in _files(folder):
            real = Path(os.path.realpath(path))
            if real in seen:
                continue
            seen.add(real)
            if path.suffix.lower() == ".mcc":
                number, kind = measurement_beam(path, beams), "measurement (.mcc)"
            else:
                number, kind = _tps_beam(path, plan_uid), "TPS RTDOSE"
            if number in found:
                found[number].append(Reference(beam_number=number, kind=kind, path=str(path)))
    return found
