"""The QA artifact a physicist opens in the Prefect UI: the verdict, the figures and the picture.

The picture is embedded as a data: URI PNG: the Prefect UI renders markdown artifacts in the
browser, which cannot load a file of the output folder (tests/test_qa_ui.py looks at it).
"""

from __future__ import annotations

import base64

from tasks.qa.model import BeamQa, format_percent


def beam_markdown(title: str, qa: BeamQa, png: bytes) -> str:
    verdict = "PASS" if qa.verdict == "pass" else "FAIL"
    picture = base64.b64encode(png).decode("ascii")
    return "\n".join(
        [
            f"# {title}: QA {verdict}",
            "",
            f"**{format_percent(qa.pass_rate or 0.0)}** of {qa.points} points pass "
            f"(action level {qa.action_level:g} %), {qa.criteria}; mean gamma {qa.mean_gamma:.2f}, "
            f"max {qa.max_gamma:.2f}.",
            "",
            f"Reference ({qa.kind}): `{qa.reference}`; picture: `{qa.picture}`.",
            "",
            f"![gamma of {title}](data:image/png;base64,{picture})",
            "",
        ]
    )
