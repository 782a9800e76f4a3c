"""The treatment machine's delivery logs as the clinic's interpreter decodes them: one source for
the sample-case writer (which encodes them) and the stand-in interpreter (which decodes them).

Facts read from the interpreter's source and its calibration files (mqi_interpreter c67da2c:
parsers/log_parser.py, config_loader.py, moqui_generator.py, scv_init_G1.txt, scv_init_G2.txt),
not its code: a `.ptn` file is headerless big-endian uint16 records of 8 columns (RawX, RawY,
RawXSize, RawYSize, Dose1, Dose2, LayerNum, BeamOnOff), one record per time sample;
position mm = (raw - offset) x gain per axis, the sample's time = its index x the time gain,
and its monitor count = round(Dose1 x the layer's monitor range factor), the range code being
PlanRange.txt's DOSE1_RANGE column. `.mgn` files are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PTN_COLUMNS = 8
RAW_X, RAW_Y, RAW_X_SIZE, RAW_Y_SIZE, DOSE1, DOSE2, LAYER_NUM, BEAM_ON_OFF = range(PTN_COLUMNS)


@dataclass(frozen=True)
class Calibration:
    """One gantry room's PTN calibration (its scv_init file)."""

    time_gain_ms: float
    x_offset: int
    y_offset: int
    x_gain_mm: float
    y_gain_mm: float

    def raw(self, x_mm: float, y_mm: float) -> tuple[int, int]:
        return round(self.x_offset + x_mm / self.x_gain_mm), round(self.y_offset + y_mm / self.y_gain_mm)

    def position(self, raw_x: np.ndarray, raw_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in mm, computed in float32 as the interpreter computes them."""
        x, y = raw_x.astype(np.float32), raw_y.astype(np.float32)
        return (x - float(self.x_offset)) * self.x_gain_mm, (y - float(self.y_offset)) * self.y_gain_mm


CALIBRATIONS = {
    "G1": Calibration(0.0600745, 16384, 16384, 0.010959, 0.0116412),
    "G2": Calibration(0.06, 24580, 32772, 0.0072600, 0.0071411),
}
# Monitor range code (PlanRange DOSE1_RANGE) -> factor from Dose1 to the monitor count.
RANGE_FACTORS = {2: 1.0, 3: 2.978723404255319, 4: 8.936170212765957, 5: 26.80851063829787}


def room_of(machine: str) -> str | None:
    """G1 or G2 from a TreatmentMachineName, as the interpreter picks its calibration."""
    rooms = [room for room in CALIBRATIONS if room in machine]
    return rooms[0] if len(rooms) == 1 else None


def encode(rows: list[list[int]]) -> bytes:
    """PTN records (lists of 8 ints) as the machine writes them."""
    return np.clip(np.asarray(rows, dtype=np.int64), 0, 0xFFFF).astype(">u2").tobytes()


def decode(data: bytes) -> np.ndarray:
    """PTN bytes as an (n, 8) int array; ValueError if they are not whole records."""
    if len(data) % (2 * PTN_COLUMNS):
        raise ValueError(f"File data size ({len(data) // 2} shorts) is not a multiple of {PTN_COLUMNS}")
    return np.frombuffer(data, dtype=">u2").reshape(-1, PTN_COLUMNS).astype(np.int64)
