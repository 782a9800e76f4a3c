"""Deciding an engine run's outcome from exit code and log lines, with the markers of the engine's profile."""

from pathlib import Path

import pytest

from config.profiles import shipped_profiles
from tasks.common.throttle import every
from tasks.common.toolrun import ToolRun
from tasks.moqui.judge import Verdict, bad_output, judge, progress_of
from tests.beams import beam_input_of

PUBLIC = shipped_profiles()["moqui-smc-public"]
CLINIC = shipped_profiles()["moqui-smc-clinic"]
WHAT = "  what():  Log Dir is not provided"


def run(code, timed_out=False):
    return ToolRun(argv=["tps_env"], log_path=Path("x.log"), returncode=code, timed_out=timed_out)


@pytest.mark.parametrize(
    ("code", "lines", "failure", "done"),
    [
        (0, ["Total histories (Particles) : 12", "Time taken by MC engine: 3.2 milli-seconds"], None, True),
        (0, ["Uploading particles with batch.. : Particle count --> 10 with 4 batches"], None, False),
        # the public build's abort: its what() line is the cause, exit 134 from SIGABRT
        (
            134,
            ["terminate called after throwing an instance of 'std::runtime_error'", WHAT],
            f"engine reported: {WHAT.strip()} (exit 134)",
            False,
        ),
        # exit 0 after a failed write: the line says it
        (
            0,
            ["Cannot write :out/a/1G_1_Dose.raw", "Time taken by MC engine: 1 milli-seconds"],
            "engine reported: Cannot write :out/a/1G_1_Dose.raw (exit 0)",
            True,
        ),
        (
            255,
            ["CUDA error: an illegal memory access was encountered 700"],
            "engine reported: CUDA error: an illegal memory access was encountered 700 (exit 255)",
            False,
        ),
        (2, ["something"], "engine exited with code 2", False),
        (
            -11,
            ["Generating particles for (1 of 4 batches) in CPU .."],
            "engine crashed (SIGSEGV, exit -11)",
            False,
        ),
        (139, ["Total beamlets (Spots) : 3"], "engine crashed (SIGSEGV, exit 139)", False),
        # the clinic's build: its own success line means nothing to the public profile
        (0, ["Total execution time: 3.2 s"], None, False),
    ],
)
def test_outcomes_under_the_public_profile(settings, code, lines, failure, done):
    verdict = judge(run(code), lines, settings.engine, PUBLIC)
    assert (verdict.failure, verdict.completed) == (failure, done)


def test_the_clinic_profile_speaks_its_builds_markers(settings):
    assert judge(run(0), ["Total execution time: 3.2 s"], settings.engine, CLINIC).completed
    verdict = judge(run(1), ["FATAL ERROR in CUDA"], settings.engine, CLINIC)
    assert verdict.failure == "engine reported: FATAL ERROR in CUDA (exit 1)"
    assert verdict.histories is None  # it does not say how many it ran


def test_exit_codes_are_explained_where_no_line_says_more(settings):
    verdict = judge(
        run(255), ["Generating particles for (1 of 4 batches) in CPU .."], settings.engine, PUBLIC
    )
    assert verdict.failure == "engine exited with code 255: a CUDA error"


def test_histories_and_beamlets_are_read_from_the_log(settings):
    lines = ["Total beamlets (Spots) : 1176", "Total histories (Particles) : 24175"]
    verdict = judge(run(0), lines, settings.engine, PUBLIC)
    assert (verdict.histories, verdict.beamlets) == (24175, 1176)


def test_no_histories_or_misread_records_are_bad_output(settings):
    beam = beam_input_of(settings, records=1176)
    assert bad_output(beam, Verdict(None, True, histories=24175, beamlets=1176)) is None
    assert "read 882 spot records, but the beam's staged layer CSVs hold 1176" in bad_output(
        beam, Verdict(None, True, histories=4835, beamlets=882)
    )
    assert "ran 0 histories" in bad_output(beam, Verdict(None, True, histories=0, beamlets=1176))


def test_timeout_wins(settings):
    verdict = judge(
        run(-15, timed_out=True), ["Generating particles for (1 of 4 batches)"], settings.engine, PUBLIC
    )
    assert verdict.failure == "engine did not finish within 120 s and was killed"


def test_progress_lines():
    assert progress_of("Generating particles for (3 of 12 batches) in CPU ..") == (3, 12)
    assert progress_of("Time taken by MC engine: 1 milli-seconds") is None


def test_no_exit_code_is_a_failure(settings):
    verdict = judge(run(None), ["Generating particles for (1 of 4 batches)"], settings.engine, PUBLIC)
    assert verdict.failure == "engine ended without an exit code"


def test_progress_updates_are_spaced():
    now = [0.0]
    shown: list[float] = []
    move = every(2.0, shown.append, clock=lambda: now[0])
    for at, done in [(0.0, 0.1), (0.5, 0.2), (1.99, 0.3), (2.0, 0.4), (3.0, 0.5), (4.5, 0.6)]:
        now[0] = at
        move(done)
    assert shown == [0.1, 0.4, 0.6]
