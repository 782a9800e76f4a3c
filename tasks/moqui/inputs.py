"""The engine input of one beam, from typed settings, the case and the beam: values, not a file yet.

MOQUI silently ignores keys it does not know and reads every value as text, so the
values come from typed settings and only the keys of `tps_file.TPS_KEYS` are written.
GPUID is left out: the GPU is known only once the beam holds a lease, and the file is
written then (BeamInput.tps_text). The phantom is centred on the beam's isocentre unless
the settings place it.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from config.settings import Settings
from tasks.casefolder import Beam, Case
from tasks.common.errors import PermanentError
from tasks.moqui.beam import BeamInput, TpsValue, input_hash
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.tps_file import format_tps


def dose_file_name(settings: Settings, beam: Beam) -> str:
    """The engine's output file name for `beam` (engine.dose_file_pattern)."""
    return settings.engine.dose_file_pattern.format(
        beam_name=beam.name,
        beam_number=beam.number,
        scorer=settings.tps.scorer,
        ext=settings.tps.output_format,
    )


def phantom_grid(settings: Settings, beam: Beam) -> PhantomGrid:
    """The configured phantom, placed where configured or centred on the beam's isocentre."""
    phantom = settings.tps.phantom
    position = phantom.position_mm or tuple(
        iso - dim * unit / 2
        for iso, dim, unit in zip(beam.isocenter_mm, phantom.dims, phantom.unit_mm, strict=True)
    )
    return PhantomGrid(dims=phantom.dims, spacing=phantom.unit_mm, position=position)  # type: ignore[arg-type]


def input_paths(csv_dir: PurePath, dose_dir: PurePath) -> dict[str, str]:
    """The moqui_tps.in keys that name folders: replaced when the engine runs on another host."""
    return {
        "ParentDir": str(csv_dir.parent),
        "DicomDir": str(csv_dir / "plan"),
        "logFilePath": str(csv_dir / "log"),
        "OutputDir": str(dose_dir),
    }


def tps_values(
    settings: Settings, case: Case, beam: Beam, csv_dir: PurePath, dose_dir: PurePath, grid: PhantomGrid
) -> dict[str, TpsValue]:
    """The engine keys for one beam, GPUID excepted."""
    if case.room is None:
        raise PermanentError(
            f"case {case.case_id}: TreatmentMachineName {case.machine!r} names no gantry room "
            "(expected G1 or G2); GantryNum cannot be set"
        )
    tps = settings.tps
    return {
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
        **grid.tps_values(),  # type: ignore[dict-item]
    }


def beam_input(settings: Settings, case: Case, beam: Beam, csv_dir: Path) -> BeamInput:
    """One beam's engine input: its values, its folders, its input hash."""
    beam_dir = settings.work_dir(case.case_id) / "beams" / f"beam-{beam.number:02d}"
    dose_dir = beam_dir / "dose"
    grid = phantom_grid(settings, beam)
    values = tps_values(settings, case, beam, csv_dir, dose_dir, grid)
    dose_dir.mkdir(parents=True, exist_ok=True)
    return BeamInput(
        case_id=case.case_id,
        beam_number=beam.number,
        beam_name=beam.name,
        beam_dir=str(beam_dir),
        csv_dir=str(csv_dir),
        csv_dir_name=beam.csv_dir_name,
        tps=values,
        grid=grid,
        dose_name=dose_file_name(settings, beam),
        input_hash=input_hash(format_tps(values), csv_dir, beam.csv_dir_name),
    )
