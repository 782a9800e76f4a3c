"""The moqui_tps.in format: the engine's only input, one `Key Value` per line.

MOQUI silently ignores keys it does not know (a renamed key once went dead
without any error), so this module is the single list of keys we write and
read; writing any other key is an error here, not a surprise on the GPU.
Both the orchestrator's writer and the stand-in engine's reader use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# Every key MOQUI's tps_env is known to read, in the order we write them.
TPS_KEYS: tuple[str, ...] = (
    "GPUID",
    "RandomSeed",
    "UseAbsolutePath",
    "TotalThreads",
    "MaxHistoriesPerBatch",
    "Verbosity",
    "ParentDir",
    "DicomPath",
    "DicomDir",
    "logFilePath",
    "GantryNum",
    "BeamNumbers",
    "UsingPhantomGeo",
    "TwoCentimeterMode",
    "PhantomDimX",
    "PhantomDimY",
    "PhantomDimZ",
    "PhantomUnitX",
    "PhantomUnitY",
    "PhantomUnitZ",
    "PhantomPositionX",
    "PhantomPositionY",
    "PhantomPositionZ",
    "Scorer",
    "SupressStd",
    "ReadStructure",
    "BodyContourName",
    "SourceType",
    "SimulationType",
    "ParticlesPerHistory",
    "NormalizeTotalHistories",
    "ScoreToCTGrid",
    "OutputDir",
    "OutputFormat",
    "OverwriteResults",
)


class TpsFormatError(ValueError):
    """A moqui_tps.in that cannot be written or read as the engine expects."""


def _format_value(key: str, value: object) -> str:
    """A value as the engine reads it back: one line, no '#' (a comment starts there), no padding."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if not text or "\n" in text or "\r" in text:
        raise TpsFormatError(f"{key}: value {text!r} cannot be written on one line")
    if "#" in text:
        raise TpsFormatError(f"{key}: value {text!r} holds '#', where the engine's reader cuts a comment off")
    if text != text.strip():
        raise TpsFormatError(f"{key}: value {text!r} starts or ends with white space, which the engine drops")
    return text


def format_tps(values: Mapping[str, object]) -> str:
    """Render `values` as moqui_tps.in text; unknown keys and None values are errors."""
    unknown = sorted(set(values) - set(TPS_KEYS))
    if unknown:
        raise TpsFormatError(f"unknown moqui_tps.in key(s): {', '.join(unknown)}")
    lines = []
    for key in TPS_KEYS:
        if key not in values:
            continue
        value = values[key]
        if value is None:
            raise TpsFormatError(f"moqui_tps.in key {key} has no value")
        lines.append(f"{key} {_format_value(key, value)}")
    return "\n".join(lines) + "\n"


def parse_tps(text: str, source: str = "moqui_tps.in") -> dict[str, str]:
    """Parse moqui_tps.in text into {key: value}; blank lines and `#` comments are skipped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        if not value:
            raise TpsFormatError(f"{source}:{number}: key {key} has no value")
        if key in values:
            raise TpsFormatError(f"{source}:{number}: key {key} appears twice")
        values[key] = value
    return values


def read_tps(path: Path) -> dict[str, str]:
    return parse_tps(path.read_text(encoding="utf-8"), source=str(path))
