"""Which stored beam simulations a rerun may reuse (tasks/prefect_api/reuse.py): plain files, no server."""

from __future__ import annotations

import os

import pytest
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore

from tasks.moqui.beam import BeamInput, BeamResult
from tasks.moqui.grid import PhantomGrid
from tasks.prefect_api.reuse import beams_to_simulate_again, results_dir, simulation_key, stale_reason
from tests.beams import unbacked_content


def beam(settings, number: int, input_hash: str = "h") -> BeamInput:
    beam_dir = settings.work_dir("R") / "beams" / f"beam-{number:02d}"
    return BeamInput(
        case_id="R",
        beam_number=number,
        beam_name=f"{number}G000:TX",
        beam_dir=str(beam_dir),
        stage_dir=str(beam_dir / "input"),
        records=1,
        tps={},
        grid=PhantomGrid(dims=(2, 2, 2), spacing=(1.0, 1.0, 1.0), position=(0.0, 0.0, 0.0)),
        dose_name=f"{number}G000:TX_{number}_Dose.raw",
        input_hash=f"{input_hash}{number}",
        case_content=unbacked_content("R"),
    )


def dose_file(beam: BeamInput) -> str:
    return str(beam.dose_dir / beam.dose_name)


def store(settings, simulated: BeamInput) -> None:
    """What the simulate task leaves behind: the dose file, then its stored result."""
    os.makedirs(simulated.dose_dir, exist_ok=True)
    with open(dose_file(simulated), "wb") as dose:
        dose.write(b"\0" * 64)
    result = BeamResult(
        beam=simulated,
        dose_file=dose_file(simulated),
        engine_log="",
        engine_command=[],
        host="h",
        gpu=0,
        attempts=1,
        started=0.0,
        ended=1.0,
    )
    ResultStore(result_storage=LocalFileSystem(basepath=str(results_dir(settings)))).write(
        result, key=simulation_key(settings, simulated)
    )


def test_a_stored_result_is_reused_only_while_its_dose_file_is_the_one_it_wrote(settings):
    two, three, four = beam(settings, 2), beam(settings, 3), beam(settings, 4)
    for simulated in (two, three, four):
        store(settings, simulated)
    assert stale_reason(settings, two) is None
    os.remove(dose_file(three))
    assert "is gone" in stale_reason(settings, three)
    stored = (results_dir(settings) / simulation_key(settings, four)).stat().st_mtime_ns
    os.utime(dose_file(four), ns=(stored + 10**9, stored + 10**9))  # overwritten by a run with other inputs
    assert "rewritten after the result was stored" in stale_reason(settings, four)
    assert stale_reason(settings, beam(settings, 2, input_hash="other")) is None  # nothing stored for it
    again = beams_to_simulate_again(settings, [two, three, four], rerun=[], force=False)
    assert sorted(again) == [3, 4]
    assert sorted(beams_to_simulate_again(settings, [two, three, four], rerun=[2], force=False)) == [2, 3, 4]
    assert sorted(beams_to_simulate_again(settings, [two], rerun=[], force=True)) == [2]


def test_the_key_follows_inputs_and_engine_not_the_run(settings):
    two = beam(settings, 2)
    assert simulation_key(settings, two) == simulation_key(settings, beam(settings, 2))
    assert simulation_key(settings, two) != simulation_key(settings, beam(settings, 2, input_hash="x"))
    other_engine = settings.model_copy(
        update={"engine": settings.engine.model_copy(update={"command": ["/opt/moqui/tps_env", "{input}"]})}
    )
    assert simulation_key(settings, two) != simulation_key(other_engine, two)


def test_asking_for_a_beam_the_case_does_not_have_names_the_case_and_its_beams(settings):
    with pytest.raises(ValueError, match=r"case R: beam\(s\) 7 asked to rerun .* \(treatment beams: 2, 3\)"):
        beams_to_simulate_again(settings, [beam(settings, 2), beam(settings, 3)], rerun=[7], force=False)
