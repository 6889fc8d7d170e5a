"""Shared pytest fixtures: heavy objects are built once per test session."""

from __future__ import annotations

import pytest

from ingestion.embedder import Embedder


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real bundled all-MiniLM-L6-v2 (256 tokens), loaded once (~13 s) for the whole session."""
    return Embedder("bundled:all-MiniLM-L6-v2")
