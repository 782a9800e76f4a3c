"""Engine profiles: what one MOQUI build reads from moqui_tps.in and prints, as data.

Two builds are known and they differ where it matters: the public fork (moqui_rev,
v1.0.8) reads its folders relative to ParentDir, scales histories with
ParticlesPerHistory, names its output `<BeamName>_<child index>_<Scorer>` and ends with
`Time taken by MC engine:`; the clinic's production build, as the previous
orchestrator drove it, reads absolute DicomPath/DicomDir, NormalizeTotalHistories, and
ends with `Total execution time:`. A profile says all of that, so swapping builds is a
configuration change (`engine.profile`); a site with another build describes it under
`engine_profiles:` in its config. The shipped profiles are in engine_profiles.yaml.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SHIPPED = Path(__file__).resolve().parent / "engine_profiles.yaml"
OUTPUT_FILE_FIELDS = {"beam_name", "beam_number", "child", "scorer", "ext"}


class TwoCentimeterPlane(BaseModel):
    """The dose plane TwoCentimeterMode scores instead of the phantom grid."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dims: tuple[int, int, int] = Field(description="Voxels in x, y, z of the scored plane.")
    spacing_mm: tuple[float, float, float] = Field(description="Voxel size (mm) of the scored plane.")
    position_mm: tuple[float, float, float] = Field(
        description="Outer corner of the plane's first voxel (mm, beam-aligned phantom frame)."
    )
    surface_mm: float = Field(description="z (mm) of the water surface the beam enters: depth = surface - z.")
    min_phantom_voxels: int = Field(
        0,
        ge=0,
        description="PhantomDimX*Y*Z must be at least this in this mode (the public build sizes its "
        "scorer table from them and hangs when the plane does not fit).",
    )


class EngineProfile(BaseModel):
    """What one engine build reads and prints."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    description: str = Field(
        min_length=1, description="Which build this profile describes, and how it is known."
    )
    path_mode: Literal["relative", "absolute"] = Field(
        description="relative: UseAbsolutePath false, the plan and log folders named relative to "
        "ParentDir; absolute: UseAbsolutePath true, absolute folder paths."
    )
    plan_dir_keys: list[str] = Field(
        min_length=1, description="The moqui_tps.in key(s) that name the plan folder (each is written)."
    )
    histories_key: str = Field(
        min_length=1,
        description="The key that carries tps.particles_per_history (ParticlesPerHistory in the public "
        "build, NormalizeTotalHistories in the clinic's).",
    )
    output_file: str = Field(
        min_length=1,
        description="The dose file in OutputDir: {beam_name} {beam_number} {child} (the phantom's index "
        "among the world's children) {scorer} {ext}; a '*' matches anything, and exactly one file "
        "must match.",
    )
    success_markers: list[str] = Field(
        min_length=1, description="A log line holding one of these means the engine finished its simulation."
    )
    failure_markers: list[str] = Field(
        min_length=1, description="A log line holding one of these fails the run, whatever the exit code."
    )
    exit_codes: dict[int, str] = Field(
        default={}, description="What the engine's exit codes mean, for the failure message."
    )
    histories_line: str | None = Field(
        None, description="Regular expression whose group 1 is the number of histories the engine ran."
    )
    beamlets_line: str | None = Field(
        None, description="Regular expression whose group 1 is the number of spot records the engine read."
    )
    layer_record: Literal["trailing_comma", "as_interpreted"] = Field(
        description="How the engine reads layer CSV records: trailing_comma, `time,x,y,count,` (the public "
        "build splits whole files at commas), or as_interpreted (the interpreter's rows as they are)."
    )
    zero_plan_angles: bool = Field(
        description="Set the treated beam's first control point gantry, couch and collimator angles to 0 "
        "in the engine's plan copy (the public build rotates its beam-aligned phantom by them)."
    )
    integer_geometry: bool = Field(
        description="The build reads PhantomUnit* and PhantomPosition* as integers (whole mm only)."
    )
    raw_dose_pph_power: float = Field(
        description="RTDOSE Gy = raw value x dose.gy_per_unit x particles_per_history^power (the public "
        "build runs count x pph histories and scales its output by pph again: -2)."
    )
    two_centimeter_plane: TwoCentimeterPlane = Field(description="The plane TwoCentimeterMode scores.")

    @field_validator("output_file")
    @classmethod
    def _output_file(cls, value: str) -> str:
        import string

        used = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
        unknown = used - OUTPUT_FILE_FIELDS
        if unknown or "" in used:
            raise ValueError(
                f"{value!r} uses unknown placeholder(s) {', '.join(sorted(unknown)) or '{}'}; "
                f"allowed: {', '.join('{' + f + '}' for f in sorted(OUTPUT_FILE_FIELDS))}"
            )
        if "/" in value:
            raise ValueError(f"{value!r} must be a file name in OutputDir, not a path")
        return value

    @field_validator("histories_line", "beamlets_line")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                if re.compile(value).groups < 1:
                    raise ValueError(f"{value!r} has no group for the number")
            except re.error as bad:
                raise ValueError(f"{value!r} is not a regular expression: {bad}") from None
        return value

    @model_validator(mode="after")
    def _keys_are_distinct(self) -> EngineProfile:
        if self.histories_key in self.plan_dir_keys:
            raise ValueError("histories_key cannot also name the plan folder")
        return self


@lru_cache(maxsize=1)
def shipped_profiles() -> dict[str, EngineProfile]:
    """The profiles that come with MQI Communicator (engine_profiles.yaml), validated."""
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    return {name: EngineProfile.model_validate(profile) for name, profile in data.items()}
