"""Fixtures of the research tests: the tests' tiny SD-shaped pipelines (``tests/tiny_models.py``) and an
offline switch for the shipped toy model. ``tests/`` goes on ``sys.path`` for ``tiny_models`` and
``benchmark_scripts`` (which loads ``benchmarks/`` and ``research/probes/`` scripts as modules)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))

from tiny_models import tiny_components  # noqa: E402

# as tests/conftest.py: tiny models gain nothing from several threads (CE_TEST_THREADS overrides)
torch.set_num_threads(int(os.environ.get("CE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def components_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")

    def make(kind: str, seed: int = 0) -> dict:
        return tiny_components(kind, root / f"{kind}-{seed}", seed=seed)

    return make


@pytest.fixture(scope="module")
def offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    mp.undo()
