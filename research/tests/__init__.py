"""Tests of the research code (``python -m pytest -q research/tests`` from the repository root)."""
