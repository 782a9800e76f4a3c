"""A beam's own input folder for the engine: a plan copy and exactly this beam's layer CSVs.

The public engine picks, for `BeamNumbers k`, the plan beam numbered k, but it names its
output after the (k-1)-th beam of IonBeamSequence and reads the (k-1)-th entry, in sorted
order, of the log folder (its source: mqi_tps_env.hpp read_logfile_dir). Handed the
interpreter's output as it is, with a SETUP beam first, beam 2 reads beam 3's CSVs and the
last beam reads nothing. So every beam gets a folder of its own:

    <folder>/plan/plan.dcm         a copy of the plan with this beam at position p of
                                   IonBeamSequence, numbered p + 1 (p = k - 1 when there are k
                                   beams or more; a beam numbered beyond the count takes the
                                   last place and swaps numbers with the beam numbered there)
    <folder>/log/<0..p-1>_pad/     p empty folders, so that this beam's folder is entry p
    <folder>/log/<p>_<beam>/       the beam's layer CSVs, converted to the engine's records

and `BeamNumbers p + 1`. The engine's CSV reader splits a whole file at commas and reads
groups of four, so the interpreter's `time,x,y,MU` rows (no trailing comma) are read
shifted from the second row on; they are rewritten as `time,x,y,count,` where the
profile says so. Where the profile says so, the beam's first control point gets gantry,
couch and collimator angle 0: the public engine rotates its beam-aligned phantom by them
(a gantry of 180 gives an all-zero dose). The interpreter's output is never changed.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from config.profiles import EngineProfile
from tasks.casefolder import Beam
from tasks.common.errors import PermanentError

ZEROED_ANGLES = ("GantryAngle", "PatientSupportAngle", "BeamLimitingDeviceAngle")


@dataclass(frozen=True)
class StagedBeam:
    """What staging made: the folder, the BeamNumbers the engine is given, and the records it must read."""

    folder: Path
    engine_beam_number: int
    records: int  # spot records in the beam's layer CSVs: the engine's "Total beamlets"


def _position(plan: Dataset, number: int, subject: str) -> int:
    """Put beam `number` where the engine looks for it; return its engine beam number (position + 1)."""
    beams = list(plan.IonBeamSequence)
    found = [i for i, item in enumerate(beams) if int(item.BeamNumber) == number]
    if len(found) != 1:
        raise PermanentError(f"{subject}: the plan has {len(found)} beams numbered {number}")
    here, place = found[0], min(number, len(beams)) - 1
    beams[here], beams[place] = beams[place], beams[here]
    engine_number = place + 1
    if number != engine_number:  # numbered beyond the count: swap numbers with the beam numbered so
        swap = {number: engine_number, engine_number: number}
        for item in beams:
            item.BeamNumber = swap.get(int(item.BeamNumber), int(item.BeamNumber))
        for group in plan.get("FractionGroupSequence", []):
            for ref in group.get("ReferencedBeamSequence", []):
                old = int(ref.ReferencedBeamNumber)
                ref.ReferencedBeamNumber = swap.get(old, old)
    plan.IonBeamSequence = beams
    return engine_number


def _plan_copy(plan_path: Path, beam: Beam, profile: EngineProfile, out: Path, subject: str) -> int:
    plan = pydicom.dcmread(plan_path)
    engine_number = _position(plan, beam.number, subject)
    if profile.zero_plan_angles:
        item = plan.IonBeamSequence[engine_number - 1]
        first = item.IonControlPointSequence[0]
        for keyword in ZEROED_ANGLES:
            if keyword in first:
                setattr(first, keyword, "0")
    out.mkdir(parents=True)
    plan.save_as(out / "plan.dcm", enforce_file_format=True)  # a plain name, safe on any host
    return engine_number


def _convert(source: Path, target: Path, profile: EngineProfile, subject: str) -> int:
    """Copy one layer CSV as the engine reads it; return its records."""
    if profile.layer_record == "as_interpreted":
        shutil.copyfile(source, target)
        with source.open(newline="") as rows:
            return sum(1 for row in csv.reader(rows) if row)
    records = 0
    with source.open(newline="", encoding="utf-8") as rows, target.open("w", encoding="ascii") as out:
        for line, row in enumerate(csv.reader(rows), start=1):
            if not row:
                continue
            where = f"{subject}: {source}, line {line}"
            if len(row) != 4:
                raise PermanentError(f"{where}: {len(row)} fields, expected time,x,y,MU")
            time_ms, x, y, mu = (field.strip() for field in row)
            try:
                float(time_ms), float(x), float(y)
                count = float(mu)
            except ValueError:
                raise PermanentError(f"{where}: not numbers: {','.join(row)[:80]!r}") from None
            if count < 0 or count != int(count):
                raise PermanentError(f"{where}: MU {mu!r} is not a whole, non-negative count")
            out.write(f"{time_ms},{x},{y},{int(count)},\n")
            records += 1
    return records


def stage_beam(
    profile: EngineProfile, plan_path: Path, csv_dir: Path, beam: Beam, folder: Path, subject: str
) -> StagedBeam:
    """Write `folder` (replacing what an earlier run left there) for `beam`; see the module doc."""
    shutil.rmtree(folder, ignore_errors=True)
    engine_number = _plan_copy(plan_path, beam, profile, folder / "plan", subject)
    place = engine_number - 1
    width = len(str(place))
    log = folder / "log"
    for pad in range(place):
        (log / f"{pad:0{width}d}_pad").mkdir(parents=True)
    target = log / f"{place:0{width}d}_{beam.csv_dir_name}"
    target.mkdir(parents=True)
    sources = sorted((csv_dir / "log" / beam.csv_dir_name).glob("*.csv"))
    if not sources:
        raise PermanentError(f"{subject}: no layer CSVs in {csv_dir / 'log' / beam.csv_dir_name}")
    records = sum(_convert(source, target / source.name, profile, subject) for source in sources)
    return StagedBeam(folder=folder, engine_beam_number=engine_number, records=records)


def staged_files(folder: Path) -> list[Path]:
    """Every file of a staged folder (the plan copy and the layer CSVs), sorted: what the engine reads."""
    return sorted(path for path in folder.rglob("*") if path.is_file())


def staged_folders(folder: Path) -> list[Path]:
    """Every folder inside a staged folder (the pads included: their count steers the engine)."""
    return sorted(path for path in folder.rglob("*") if path.is_dir())
