"""How a case and a beam are named in every message: one source, so each fact is said once."""

from __future__ import annotations


def beam_label(number: int, name: str) -> str:
    """`beam 2 (1G180:TX)`."""
    return f"beam {number} ({name})"


def beam_title(number: int, name: str) -> str:
    """`Beam 2 (1G180:TX)`: a beam at the start of a heading or sentence."""
    return f"Beam {number} ({name})"


def beam_subject(case_id: str, number: int, name: str) -> str:
    """`case P1: beam 2 (1G180:TX)`: what a standalone message about a beam starts with."""
    return f"case {case_id}: {beam_label(number, name)}"
