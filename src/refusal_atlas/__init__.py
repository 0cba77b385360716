"""refusal-atlas: map sources of harm to refusal mechanisms inside chat models.

This module is the public facade on top of every layer (foundation -> taxonomy -> ontology -> lm ->
curation -> mechinterp -> organism -> atlas -> cli): it re-exports the few functions a notebook
needs, and no module of the package imports it. See the README's "Python API" section.
"""

from __future__ import annotations

from pathlib import Path

from refusal_atlas.atlas.query import load_vector, node_report, rank_direction, source_report, sparql
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import Activations, capture_activations
from refusal_atlas.lm.models import LoadedModel, load_model
from refusal_atlas.mechinterp.directions import DirectionSet, compute_directions
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy
from refusal_atlas.taxonomy.resolve import resolve

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "AtlasError",
    "AtlasStore",
    "DirectionSet",
    "LoadedModel",
    "Taxonomy",
    "__version__",
    "capture_activations",
    "compute_directions",
    "load_model",
    "load_taxonomy",
    "load_vector",
    "node_report",
    "open_atlas",
    "rank_direction",
    "resolve",
    "source_report",
    "sparql",
]


def open_atlas(path: str | Path) -> AtlasStore:
    """The atlas folder written by `refusal-atlas run` (a str or a Path), read lazily."""
    return AtlasStore.open(path)
