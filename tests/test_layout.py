"""The layout keeps its promises: task modules in tasks/, domain packages without Prefect, every
setting described."""

from __future__ import annotations

import subprocess
import sys
from importlib import import_module
from pathlib import Path

from prefect import Task

from config.explain import missing_descriptions
from config.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DOMAIN_PACKAGES = (
    "casefolder",
    "scanfolder",
    "interpreter",
    "moqui",
    "dose",
    "backends",
    "common",
    "outcome",
    "qa",
)
DOMAIN_MODULES_ELSEWHERE = ("tasks.gpu.pool", "tasks.gpu.handoff", "tasks.gpu.nvidia_smi")


def domain_modules() -> list[str]:
    names = []
    for package in DOMAIN_PACKAGES:
        for path in sorted((REPO / "tasks" / package).glob("*.py")):
            stem = path.stem
            names.append(f"tasks.{package}" if stem == "__init__" else f"tasks.{package}.{stem}")
    return [*names, *DOMAIN_MODULES_ELSEWHERE, "config", "config.explain"]


def test_domain_packages_load_without_prefect():
    modules = domain_modules()
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in modules)
        + "loaded = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        + "print(len(loaded), loaded[:5])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.startswith("0 "), f"importing the domain packages loaded Prefect: {done.stdout}"
    assert len(modules) > 30


def test_tasks_holds_only_task_modules():
    for path in sorted((REPO / "tasks").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = import_module(f"tasks.{path.stem}")
        tasks = [name for name, value in vars(module).items() if isinstance(value, Task)]
        defined = [name for name in tasks if getattr(module, name).fn.__module__ == module.__name__]
        assert defined, f"tasks/{path.name} defines no Prefect task: move it into a domain package"


def test_every_setting_has_a_description():
    assert missing_descriptions(Settings) == []
