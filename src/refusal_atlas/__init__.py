"""refusal-atlas: map sources of harm to refusal mechanisms inside chat models.

This module is the public facade on top of every layer (foundation -> taxonomy -> ontology -> lm ->
curation -> mechinterp -> organism -> atlas -> cli): it re-exports the few functions a notebook
needs, and no module of the package imports it. See the README's "Python API" section.

The exports resolve on first attribute access (PEP 562): importing any submodule, e.g.
`refusal_atlas.errors` for the CLI's error handling, must not pay for torch, transformers and rdflib.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refusal_atlas.atlas.query import load_vector, node_report, rank_direction, source_report, sparql
    from refusal_atlas.atlas.store import AtlasStore
    from refusal_atlas.errors import AtlasError
    from refusal_atlas.lm.capture import Activations, capture_activations
    from refusal_atlas.lm.models import LoadedModel, load_model
    from refusal_atlas.mechinterp.directions import DirectionSet, compute_directions
    from refusal_atlas.mechinterp.sae import load_sae
    from refusal_atlas.taxonomy.loader import load_taxonomy
    from refusal_atlas.taxonomy.model import Taxonomy
    from refusal_atlas.taxonomy.resolve import resolve

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Activations": "refusal_atlas.lm.capture",
    "AtlasError": "refusal_atlas.errors",
    "AtlasStore": "refusal_atlas.atlas.store",
    "DirectionSet": "refusal_atlas.mechinterp.directions",
    "LoadedModel": "refusal_atlas.lm.models",
    "Taxonomy": "refusal_atlas.taxonomy.model",
    "capture_activations": "refusal_atlas.lm.capture",
    "compute_directions": "refusal_atlas.mechinterp.directions",
    "load_model": "refusal_atlas.lm.models",
    "load_sae": "refusal_atlas.mechinterp.sae",
    "load_taxonomy": "refusal_atlas.taxonomy.loader",
    "load_vector": "refusal_atlas.atlas.query",
    "node_report": "refusal_atlas.atlas.query",
    "rank_direction": "refusal_atlas.atlas.query",
    "resolve": "refusal_atlas.taxonomy.resolve",
    "source_report": "refusal_atlas.atlas.query",
    "sparql": "refusal_atlas.atlas.query",
}

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
    "load_sae",
    "load_taxonomy",
    "load_vector",
    "node_report",
    "open_atlas",
    "rank_direction",
    "resolve",
    "source_report",
    "sparql",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refusal_atlas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def open_atlas(path: str | Path) -> AtlasStore:
    """The atlas folder written by `refusal-atlas run` (a str or a Path), read lazily."""
    store_cls: type[AtlasStore] = __getattr__("AtlasStore")
    return store_cls.open(path)
