"""Write one moqui_tps.in per beam from typed settings, and fingerprint the beam's inputs.

The file is written without GPUID: the GPU is only known once the beam holds
a lease, and `with_gpu` adds it then. The input hash covers everything the
engine reads for the beam (the tps text without GPUID, the plan, the beam's
layer CSVs), so a rerun with identical inputs can be recognised whatever GPU
it lands on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePath

from prefect import task
from pydantic import BaseModel

from config.settings import Settings
from tasks.casefolder import Beam, Case
from tasks.errors import PermanentError
from tasks.moqui_input import format_tps, parse_tps

TPS_NAME = "moqui_tps.in"


class BeamInput(BaseModel):
    """Where a beam's engine input and output live (small: passed between tasks)."""

    case_id: str
    beam_number: int
    beam_name: str
    beam_dir: str
    tps_path: str
    dose_dir: str
    dose_file: str
    input_hash: str


def dose_file_name(settings: Settings, beam: Beam) -> str:
    return settings.engine.dose_file_pattern.format(
        beam_name=beam.name,
        beam_number=beam.number,
        scorer=settings.tps.scorer,
        ext=settings.tps.output_format,
    )


def tps_values(
    settings: Settings, case: Case, beam: Beam, csv_dir: Path, dose_dir: Path
) -> dict[str, object]:
    """The engine keys for one beam; GPUID is added later by `with_gpu`."""
    if case.room is None:
        raise PermanentError(
            f"case {case.case_id}: TreatmentMachineName {case.machine!r} names no gantry room "
            "(expected G1 or G2); GantryNum cannot be set"
        )
    tps, phantom = settings.tps, settings.tps.phantom
    position = phantom.position_mm or tuple(  # centred on the isocentre
        iso - dim * unit / 2
        for iso, dim, unit in zip(beam.isocenter_mm, phantom.dims, phantom.unit_mm, strict=True)
    )
    values: dict[str, object] = {
        "RandomSeed": tps.random_seed,
        "UseAbsolutePath": tps.use_absolute_path,
        "TotalThreads": tps.total_threads,
        "MaxHistoriesPerBatch": tps.max_histories_per_batch,
        "Verbosity": tps.verbosity,
        **input_paths(csv_dir, dose_dir),
        "GantryNum": case.room,
        "BeamNumbers": beam.number,
        "UsingPhantomGeo": tps.using_phantom_geo,
        "TwoCentimeterMode": tps.two_centimeter_mode,
        "Scorer": tps.scorer,
        "SupressStd": tps.supress_std,
        "ReadStructure": tps.read_structure,
        "BodyContourName": tps.body_contour_name,
        "SourceType": tps.source_type,
        "SimulationType": tps.simulation_type,
        "NormalizeTotalHistories": tps.normalize_total_histories,
        "ScoreToCTGrid": tps.score_to_ct_grid,
        "OutputFormat": tps.output_format,
        "OverwriteResults": tps.overwrite_results,
    }
    for axis, dim, unit, pos in zip("XYZ", phantom.dims, phantom.unit_mm, position, strict=True):
        values[f"PhantomDim{axis}"] = dim
        values[f"PhantomUnit{axis}"] = float(unit)
        values[f"PhantomPosition{axis}"] = float(pos)
    return values


def input_paths(csv_dir: PurePath, dose_dir: PurePath) -> dict[str, str]:
    """The moqui_tps.in keys that name folders: rewritten when the engine runs on another host."""
    return {
        "ParentDir": str(csv_dir.parent),
        "DicomDir": str(csv_dir / "plan"),
        "logFilePath": str(csv_dir / "log"),
        "OutputDir": str(dose_dir),
    }


def relocated_tps(tps_text: str, csv_dir: PurePath, dose_dir: PurePath, source: str) -> str:
    """The same moqui_tps.in with its folders moved (e.g. to the job folder on the GPU host)."""
    values: dict[str, object] = dict(parse_tps(tps_text, source))
    values.update(input_paths(csv_dir, dose_dir))
    return format_tps(values)


def engine_input_files(csv_dir: Path, csv_dir_name: str) -> list[Path]:
    """Every file the engine reads for a beam besides moqui_tps.in: the plan copy and its layer CSVs."""
    return sorted(p for p in (csv_dir / "plan").glob("*") if p.is_file()) + sorted(
        (csv_dir / "log" / csv_dir_name).glob("*.csv")
    )


def input_hash(tps_text: str, csv_dir: Path, beam: Beam) -> str:
    """sha256 over the tps text (without GPUID), the plan copy and the beam's layer CSVs."""
    digest = hashlib.sha256(tps_text.encode())
    for path in engine_input_files(csv_dir, beam.csv_dir_name):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_beam_input(settings: Settings, case: Case, beam: Beam, csv_dir: Path) -> BeamInput:
    beam_dir = settings.work_dir(case.case_id) / "beams" / f"beam-{beam.number:02d}"
    dose_dir = beam_dir / "dose"
    dose_dir.mkdir(parents=True, exist_ok=True)
    text = format_tps(tps_values(settings, case, beam, csv_dir, dose_dir))
    tps_path = beam_dir / TPS_NAME
    tps_path.write_text(text, encoding="utf-8")
    return BeamInput(
        case_id=case.case_id,
        beam_number=beam.number,
        beam_name=beam.name,
        beam_dir=str(beam_dir),
        tps_path=str(tps_path),
        dose_dir=str(dose_dir),
        dose_file=str(dose_dir / dose_file_name(settings, beam)),
        input_hash=input_hash(text, csv_dir, beam),
    )


def with_gpu(tps_path: Path, gpu: int) -> None:
    """Set GPUID in an existing moqui_tps.in: the engine picks its card only from this key."""
    values: dict[str, object] = dict(parse_tps(tps_path.read_text(encoding="utf-8"), str(tps_path)))
    values["GPUID"] = gpu
    tps_path.write_text(format_tps(values), encoding="utf-8")


@task(name="tps", task_run_name="tps beam {beam.number}")
def write_tps(settings: Settings, case: Case, beam: Beam, csv_dir: str) -> BeamInput:
    """Prefect wrapper: one beam's moqui_tps.in."""
    return write_beam_input(settings, case, beam, Path(csv_dir))
