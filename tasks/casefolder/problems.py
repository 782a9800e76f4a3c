"""Problem messages of one case folder: each names the case, so it stands alone in any log."""

from __future__ import annotations

from pathlib import Path


def relative(path: Path, case_dir: Path) -> str:
    return path.relative_to(case_dir).as_posix() if path != case_dir else "."


class Problems:
    """Problem messages, each prefixed with the case id so it stands alone in any log."""

    def __init__(self, case_id: str) -> None:
        self.case_id = case_id
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"{self.case_id}: {where}: {message}")
