"""How numbers and names are shown in messages (tasks/common/labels.py)."""

from __future__ import annotations

import pytest

from tasks.common.labels import three_figures


@pytest.mark.parametrize(
    ("gy", "shown"),
    [(1.0, "1.00"), (0.012345, "0.0123"), (62.46, "62.5"), (1234.0, "1230"), (0.0, "0.00"), (9.996, "10.0")],
)
def test_doses_are_shown_to_three_significant_figures(gy, shown):
    assert three_figures(gy) == shown
