"""One beam with the real MOQUI engine on CPU, at two history counts: the engine's time against the
orchestration's.

    python benchmarks/real_engine.py [--pph 0.1 0.5] [--beam 2]

Needs the real tools (bash .ci/real-tools.sh prints MQI_ENGINE_DIR, MQI_INTERPRETER_DIR,
MQI_INTERPRETER_PYTHON; config/examples/real-tools.yaml uses them). A sample case is
interpreted once by the real interpreter; then, per history count, its beam is run as a case
run runs it, without the Prefect server: staged, launched through the job wrapper, followed,
judged, its dose checked, converted to a validated RTDOSE. Printed per run: the engine's own
time (its `Time taken by MC engine:` line, the baseline), the beam's wall time from launch to
RTDOSE, the orchestration overhead (the difference) and the ratio wall / engine.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from config import load_settings  # noqa: E402
from standins.sample_case import write_sample_case  # noqa: E402
from tasks.backends.adopt import simulate_beam  # noqa: E402
from tasks.backends.base import Holder  # noqa: E402
from tasks.backends.local import LocalBackend  # noqa: E402
from tasks.casefolder import discover_case  # noqa: E402
from tasks.dose.outputs import convert_beam_dose  # noqa: E402
from tasks.gpu.pool import SkipReason  # noqa: E402
from tasks.interpreter.run import run_interpreter  # noqa: E402
from tasks.moqui.inputs import beam_input  # noqa: E402

ENGINE_TIME = re.compile(r"Time taken by MC engine: ([\d.]+) milli-seconds")


@contextlib.contextmanager
def any_gpu(*, only: Sequence[int] | None = None, skip: SkipReason | None = None) -> Iterator[Holder]:
    """GPU 0 without a lease: one beam, nothing to share it with."""
    yield Holder(run="benchmark", attempt=1, gpu=0, lease="")


def config(root: Path, pph: float) -> Path:
    data = yaml.safe_load((REPO / "config" / "examples" / "real-tools.yaml").read_text())
    data["data_root"] = str(root / "data")
    data["tps"]["particles_per_history"] = pph
    data["dicom"] = {"validator": "dciodvfy"}
    root.mkdir(parents=True)
    path = root / f"real-{pph:g}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pph", type=float, nargs="+", default=[0.1, 0.5], help="particles_per_history values"
    )
    parser.add_argument("--beam", type=int, default=2, help="the sample case's beam to run (2, 3 or 4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mqi-real-engine-") as tmp:
        root = Path(tmp)
        rows = []
        for pph in args.pph:
            settings = load_settings(config(root / f"pph-{pph:g}", pph))
            case = discover_case(
                write_sample_case(settings.scan_dir, "BENCH"), ready_marker=settings.case.ready_marker
            )
            beam = next(b for b in case.beams if b.number == args.beam)
            csv_dir = run_interpreter(settings, case)
            prepared = beam_input(settings, case, beam, csv_dir)
            started = time.perf_counter()
            result, _ = simulate_beam(settings, LocalBackend(settings), prepared, 1, any_gpu)
            output = convert_beam_dose(settings, case, result)
            wall = time.perf_counter() - started
            engine = float(ENGINE_TIME.search(Path(result.engine_log).read_text())[1]) / 1000
            rows.append((pph, result.histories, engine, wall, output.max_dose_gy))
    print(f"beam {args.beam} of the sample case, real engine on CPU ({settings.engine.command[0]})")
    header = ("pph", "histories", "engine s", "launch->RTDOSE s", "overhead s", "ratio", "max Gy (uncal.)")
    print("  ".join(f"{h:>10}" for h in header))
    for pph, histories, engine, wall, peak in rows:
        figures = (f"{pph:g}", histories, f"{engine:.2f}", f"{wall:.2f}", f"{wall - engine:.2f}")
        print("  ".join(f"{v:>10}" for v in (*figures, f"{wall / engine:.3f}", f"{peak:.3g}")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
