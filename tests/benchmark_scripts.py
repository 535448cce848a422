"""Import a script of ``benchmarks/`` (or of another script folder, e.g. ``research/probes/``) as a module, for
tests of its helpers; the scripts are not packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, folder: str = "benchmarks") -> ModuleType:
    """``<folder>/<name>.py`` as a module (``folder`` relative to the repository root, put on ``sys.path`` as
    when the script runs)."""
    where = ROOT / folder
    if str(where) not in sys.path:
        sys.path.append(str(where))
    spec = importlib.util.spec_from_file_location(name, where / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
