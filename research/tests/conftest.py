"""Fixtures of the research tests: the tests' tiny SD-shaped pipelines (``tests/tiny_models.py``) and an
offline switch for the shipped toy model. ``tests/`` goes on ``sys.path`` for ``tiny_models`` and
``benchmark_scripts`` (which loads ``benchmarks/`` and ``research/probes/`` scripts as modules)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))

from fixtures import components_factory, offline  # noqa: E402, F401 (fixtures shared with tests/)
