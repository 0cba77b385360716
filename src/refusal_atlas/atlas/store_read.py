"""Reading an atlas folder's files: one-line errors for unreadable ones, None for missing ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rdflib import RDF, SKOS, Graph

from refusal_atlas.errors import AtlasError
from refusal_atlas.ontology.namespaces import RA

__all__ = ["RUN_HINT", "as_float", "flat_scalars", "graph_crosswalks", "portable_model", "read_json", "read_table"]

RUN_HINT = "run `refusal-atlas run` first (or pass --atlas DIR)"


def read_json(path: Path) -> Any:
    """The JSON in `path`; an unreadable file is a one-line error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: unreadable JSON ({exc}); rerun the stage that writes it") from exc


PER_PROMPT_PREFIX = "prompt_logit_scores"


def read_table(path: Path, view: dict[str, str] | None = None) -> pd.DataFrame | None:
    """A Parquet or CSV table (by suffix) with its columns renamed by `view`; None when the file is absent."""
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()  # a stage that had no rows to write (e.g. no node with enough prompts)
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: unreadable table ({exc}); rerun the stage that writes it") from exc
    # per-prompt score lists are the verdict engine's (paired intervals), not a view the report or queries show
    df = df.drop(columns=[c for c in df.columns if str(c).startswith(PER_PROMPT_PREFIX)])
    return df.rename(columns=view) if view else df


def as_float(value: Any) -> float | None:
    """A finite float, or None (missing, NaN, not a number)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(out) else out


def flat_scalars(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts flattened to dotted keys, keeping only numbers, strings and booleans."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat_scalars(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, int | float | str | bool) and not (isinstance(value, float) and np.isnan(value)):
        return {prefix: value}
    return {}


def graph_crosswalks(graph: Graph) -> list[tuple[str, str, str, str]]:
    """(node id, SKOS predicate CURIE, external CURIE, external label) of the crosswalk triples in `graph`."""
    predicates = {SKOS.exactMatch: "skos:exactMatch", SKOS.closeMatch: "skos:closeMatch",
                  SKOS.broadMatch: "skos:broadMatch", SKOS.narrowMatch: "skos:narrowMatch",
                  SKOS.relatedMatch: "skos:relatedMatch"}
    rows = []
    for ext in set(graph.subjects(RDF.type, RA.ExternalCategory)):
        curie = graph.value(ext, SKOS.notation)
        if curie is None:
            continue
        label = graph.value(ext, SKOS.prefLabel)
        for predicate, name in predicates.items():
            for concept in graph.subjects(predicate, ext):
                node = graph.value(concept, SKOS.notation)
                if node is not None:
                    rows.append((str(node), name, str(curie), str(label or "")))
    return sorted(set(rows))


def portable_model(model: str, root: Path) -> str:
    """The model as the graph names it: a folder inside the atlas as a path relative to the atlas (so the
    graph does not carry this machine's paths), any other local path by its last two parts, a hub id as is."""
    path = Path(model)
    if not path.is_absolute():
        return model
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return "/".join(path.parts[-2:])
