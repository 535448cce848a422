"""Shared fixtures: tiny SD-shaped pipelines (see tiny_models.py), built offline from configs."""

from __future__ import annotations

import pytest

from diffusers_conceptexpress import ConceptExpressPipeline
from tiny_models import KINDS, tiny_components


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
