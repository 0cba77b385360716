"""Fixtures shared across the test folders (each folder mirrors one package of src/refusal_atlas)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BASIC_TAXONOMY = FIXTURES / "taxonomy" / "basic"


@pytest.fixture
def tdir(tmp_path: Path) -> Path:
    """A writable copy of the small fixture taxonomy (tests that edit a taxonomy never touch the original)."""
    root = tmp_path / "tax"
    shutil.copytree(BASIC_TAXONOMY, root)
    return root


@pytest.fixture(scope="session")
def shipped_taxonomy() -> Taxonomy:
    """The taxonomy shipped in data/taxonomy (loaded once per session; tests must not mutate it)."""
    return load_taxonomy()
