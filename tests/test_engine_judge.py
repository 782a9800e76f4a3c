"""Deciding an engine run's outcome from exit code, log markers and the dose file."""

from pathlib import Path

import pytest

from tasks.common.throttle import every
from tasks.common.toolrun import ToolRun
from tasks.moqui.judge import judge, progress_of


def run(code, timed_out=False):
    return ToolRun(argv=["tps_env"], log_path=Path("x.log"), returncode=code, timed_out=timed_out)


@pytest.mark.parametrize(
    ("code", "lines", "failure", "done"),
    [
        (0, ["Simulating with 4 batches", "Total execution time: 3.2 s"], None, True),
        (0, ["Simulating with 4 batches"], None, False),  # exit 0, no marker: success (dose checked)
        (0, ["ERROR: cannot open DicomDir"], "engine reported: ERROR: cannot open DicomDir (exit 0)", False),
        (1, ["FATAL ERROR in CUDA"], "engine reported: FATAL ERROR in CUDA (exit 1)", False),
        (2, ["something"], "engine exited with code 2", False),
        (-11, ["Generating particles for (1 of 4 batches)"], "engine crashed (SIGSEGV, exit -11)", False),
        (139, ["Segmentation fault (core dumped)"], "engine crashed (SIGSEGV, exit 139)", False),
    ],
)
def test_outcomes(settings, code, lines, failure, done):
    assert judge(run(code), lines, settings.engine) == (failure, done)


def test_timeout_wins(settings):
    failure, _ = judge(
        run(-15, timed_out=True), ["Generating particles for (1 of 4 batches)"], settings.engine
    )
    assert failure == "engine did not finish within 120 s and was killed"


def test_progress_lines():
    assert progress_of("Generating particles for (3 of 12 batches)") == 0.25
    assert progress_of("Total execution time: 1 s") is None


def test_no_exit_code_is_a_failure(settings):
    failure, _ = judge(run(None), ["Generating particles for (1 of 4 batches)"], settings.engine)
    assert failure == "engine ended without an exit code"


def test_progress_updates_are_spaced():
    now = [0.0]
    shown: list[float] = []
    move = every(2.0, shown.append, clock=lambda: now[0])
    for at, done in [(0.0, 0.1), (0.5, 0.2), (1.99, 0.3), (2.0, 0.4), (3.0, 0.5), (4.5, 0.6)]:
        now[0] = at
        move(done)
    assert shown == [0.1, 0.4, 0.6]
