"""The engine input of one beam, from typed settings, the engine profile, the case and the beam.

MOQUI silently ignores keys it does not know and reads every value as text, so the
values come from typed settings and only the keys of `tps_file.TPS_KEYS` are written;
which key carries what (the plan folder, the history scale) and how folders are named
(relative to ParentDir, or absolute) is the profile's (config/profiles.py). GPUID is left
out: the GPU is known only once the beam holds a lease, and the file is written then
(BeamInput.tps_text). The phantom is the engine's beam-aligned water box: by default
centred on the beam axis (x = y = 0) with the beam entering its top face at z = 0.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from config.profiles import EngineProfile
from config.settings import Settings, phantom_corner
from tasks.casefolder import Beam, Case
from tasks.common.errors import PermanentError
from tasks.common.labels import beam_subject
from tasks.moqui.beam import BeamInput, TpsValue, input_hash
from tasks.moqui.grid import PhantomGrid
from tasks.moqui.staging import StagedBeam, stage_beam
from tasks.moqui.tps_file import TpsFormatError, format_tps


def phantom_child_index(beam: Beam, two_centimeter_mode: bool) -> int:
    """The scored phantom's index among the engine's world children (the middle of its output name).

    Range shifters and blocks come first (one geometry each kind), then an air box, then the
    phantom; in TwoCentimeterMode a front slab precedes the scored one (mqi_tps_env.hpp setup_world).
    """
    return (beam.range_shifters > 0) + (beam.blocks > 0) + (2 if two_centimeter_mode else 1)


def dose_file_name(settings: Settings, profile: EngineProfile, beam: Beam) -> str:
    """The engine's output file name for `beam` (the profile's output_file; may hold '*')."""
    return profile.output_file.format(
        beam_name=beam.name,
        beam_number=beam.number,
        child=phantom_child_index(beam, settings.tps.two_centimeter_mode),
        scorer=settings.tps.scorer,
        ext=settings.tps.output_format,
    )


def phantom_grid(settings: Settings) -> PhantomGrid:
    """The configured phantom, placed where configured or centred on the beam axis below z = 0."""
    phantom = settings.tps.phantom
    return PhantomGrid(
        dims=phantom.dims,
        spacing=phantom.unit_mm,
        position=phantom.position_mm or phantom_corner(phantom),
    )


def dose_grid(settings: Settings, profile: EngineProfile) -> PhantomGrid:
    """The grid the dose comes back on: the phantom, or in TwoCentimeterMode the profile's plane."""
    if not settings.tps.two_centimeter_mode:
        return phantom_grid(settings)
    plane = profile.two_centimeter_plane
    return PhantomGrid(dims=plane.dims, spacing=plane.spacing_mm, position=plane.position_mm)


def input_paths(profile: EngineProfile, stage: PurePath, dose_dir: PurePath) -> dict[str, str]:
    """The moqui_tps.in keys that name folders, for a staged input at `stage`, on the engine's machine."""
    relative = profile.path_mode == "relative"
    plan = "plan" if relative else str(stage / "plan")
    return {
        "ParentDir": str(stage),
        **dict.fromkeys(profile.plan_dir_keys, plan),
        "logFilePath": "log" if relative else str(stage / "log"),
        "OutputDir": str(dose_dir),
    }


def tps_values(settings: Settings, case: Case, staged: StagedBeam, dose_dir: PurePath) -> dict[str, TpsValue]:
    """The engine keys for one staged beam, GPUID excepted."""
    if case.room is None:
        raise PermanentError(
            f"case {case.case_id}: TreatmentMachineName {case.machine!r} names no gantry room "
            "(expected G1 or G2); GantryNum cannot be set"
        )
    tps, profile = settings.tps, settings.engine_profile
    return {
        "RandomSeed": tps.random_seed,
        "UseAbsolutePath": profile.path_mode == "absolute",
        "TotalThreads": tps.total_threads,
        "MaxHistoriesPerBatch": tps.max_histories_per_batch,
        "Verbosity": tps.verbosity,
        **input_paths(profile, staged.folder, dose_dir),
        "GantryNum": case.room,
        "BeamNumbers": staged.engine_beam_number,
        "UsingPhantomGeo": tps.using_phantom_geo,
        "TwoCentimeterMode": tps.two_centimeter_mode,
        "Scorer": tps.scorer,
        "SupressStd": tps.supress_std,
        "ReadStructure": tps.read_structure,
        "BodyContourName": tps.body_contour_name,
        "SourceType": tps.source_type,
        "SimulationType": tps.simulation_type,
        profile.histories_key: tps.particles_per_history,
        "ScoreToCTGrid": tps.score_to_ct_grid,
        "OutputFormat": tps.output_format,
        "OverwriteResults": tps.overwrite_results,
        **phantom_grid(settings).tps_values(whole_mm=profile.integer_geometry),
    }


def beam_input(settings: Settings, case: Case, beam: Beam, csv_dir: Path) -> BeamInput:
    """One beam's engine input: its staged folder, its values, its input hash."""
    subject = beam_subject(case.case_id, beam.number, beam.name)
    profile = settings.engine_profile
    beam_dir = settings.work_dir(case.case_id) / "beams" / f"beam-{beam.number:02d}"
    dose_dir = beam_dir / "dose"
    staged = stage_beam(profile, Path(case.plan_path), csv_dir, beam, beam_dir / "input", subject)
    values = tps_values(settings, case, staged, dose_dir)
    try:
        text = format_tps(values)
    except TpsFormatError as bad:
        raise PermanentError(f"{subject}: moqui_tps.in cannot be written: {bad}") from None
    dose_dir.mkdir(parents=True, exist_ok=True)
    return BeamInput(
        case_id=case.case_id,
        beam_number=beam.number,
        beam_name=beam.name,
        beam_dir=str(beam_dir),
        stage_dir=str(staged.folder),
        records=staged.records,
        tps=values,
        grid=dose_grid(settings, profile),
        dose_name=dose_file_name(settings, profile, beam),
        input_hash=input_hash(text, staged.folder),
        case_content=case.content,
    )
