"""Shared fixtures: tiny SD-shaped pipelines (see tiny_models.py), built offline from configs."""

from __future__ import annotations

import pytest

from diffusers_conceptexpress import ConceptExpressPipeline
from fixtures import components_factory, offline  # noqa: F401 (fixtures)
from tiny_models import KINDS


@pytest.fixture(scope="session", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def tiny_pipe(kind, components_factory) -> ConceptExpressPipeline:  # noqa: F811 (the fixture)
    return ConceptExpressPipeline(**components_factory(kind))
