"""Shared fixtures: tiny SD-shaped pipelines (see tiny_models.py), built offline from configs."""

from __future__ import annotations

import os

import pytest
import torch

from diffusers_conceptexpress import ConceptExpressPipeline
from tiny_models import KINDS, tiny_components

# Tiny models gain nothing from several threads, and on a busy 2-core machine OpenMP threads that wait for
# each other make runs many times slower; CE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("CE_TEST_THREADS", "1")))


@pytest.fixture(scope="session", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def components_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")

    def make(kind: str, seed: int = 0) -> dict:
        return tiny_components(kind, root / f"{kind}-{seed}", seed=seed)

    return make


@pytest.fixture
def tiny_pipe(kind, components_factory) -> ConceptExpressPipeline:
    return ConceptExpressPipeline(**components_factory(kind))
