"""Fixtures shared by the product tests (``tests/conftest.py``) and the research tests
(``research/tests/conftest.py``), which import them into their conftest namespaces."""

from __future__ import annotations

import os

import pytest
import torch

from tiny_models import tiny_components

# Tiny models gain nothing from several threads, and on a busy 2-core machine OpenMP threads that wait for
# each other make runs many times slower; CE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("CE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def components_factory(tmp_path_factory):
    """``make(kind, seed=0)``: the components of a tiny pipeline of that kind (``tiny_models.KINDS``)."""
    root = tmp_path_factory.mktemp("tiny")

    def make(kind: str, seed: int = 0) -> dict:
        return tiny_components(kind, root / f"{kind}-{seed}", seed=seed)

    return make


@pytest.fixture(scope="module")
def offline():
    """The hub switched off: anything that would download fails instead."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    mp.undo()
