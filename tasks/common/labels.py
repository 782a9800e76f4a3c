"""How a case and a beam are named in every message: one source, so each fact is said once."""

from __future__ import annotations

import math


def beam_label(number: int, name: str) -> str:
    """`beam 2 (1G180:TX)`."""
    return f"beam {number} ({name})"


def beam_title(number: int, name: str) -> str:
    """`Beam 2 (1G180:TX)`: a beam at the start of a heading or sentence."""
    return f"Beam {number} ({name})"


def beam_subject(case_id: str, number: int, name: str) -> str:
    """`case P1: beam 2 (1G180:TX)`: what a standalone message about a beam starts with."""
    return f"case {case_id}: {beam_label(number, name)}"


def three_figures(value: float) -> str:
    """A dose as a physicist reads it, to 3 significant figures: `1.00`, `0.0123`, `62.5`, `1230`."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.2f}"
    rounded = float(f"{value:.3g}")  # 9.996 -> 10.0: the decade after rounding decides the decimals
    decimals = 2 - math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{decimals}f}" if decimals >= 0 else f"{rounded:.0f}"
