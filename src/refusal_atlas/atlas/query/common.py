"""What every query needs: JSON-safe values, node checks, the selected layer, the fallback for unanalysed nodes."""

from __future__ import annotations

import difflib
import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy.model import Taxonomy

POOLED = "@pooled"


def _clean(value: Any) -> Any:
    """JSON-safe scalars (NaN -> None, numpy -> python)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def _records(df: pd.DataFrame | None) -> list[dict[str, Any]]:
    return [] if df is None else [_clean(r) for r in df.to_dict("records")]


def _require_node(store: AtlasStore, node_id: str) -> None:
    known: set[str] = set()
    if store.taxonomy is not None:
        known |= set(store.taxonomy.nodes)
    known |= set(store.analysed_nodes)
    if not known:
        store.require("taxonomy (taxonomy.ttl) or directions", False)
    if node_id not in known:
        close = difflib.get_close_matches(node_id, sorted(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `refusal-atlas taxonomy show` lists them"
        raise AtlasError(f"node {node_id!r} is not in this atlas{hint}")


def selected_layer_position(store: AtlasStore) -> tuple[int, str] | None:
    """The (layer, position label) the causal stage selected: the pooled row's, else the most chosen one."""
    sel = store.selection
    if sel is None or "selected" not in sel.columns:
        return None
    chosen = sel[sel["selected"].fillna(False).astype(bool)]
    if chosen.empty:
        return None
    pooled = chosen[chosen["node"].astype(str) == POOLED]
    rows = pooled if not pooled.empty else chosen
    counts = Counter(zip(rows["layer"].astype(int), rows["position"].astype(str), strict=True))
    (layer, pos), _ = counts.most_common(1)[0]
    return int(layer), str(pos)


def _primary_ancestors(tax: Taxonomy, node_id: str) -> list[str]:
    """Ancestors along first-listed parents (the branch rule `Taxonomy.branch_of` follows), nearest first."""
    chain: list[str] = []
    current = node_id
    while True:
        parents = [p for p in tax.nodes[current].broader if p in tax.nodes]
        if not parents or parents[0] in chain or parents[0] == node_id:
            return chain
        current = parents[0]
        chain.append(current)


def analysed_fallback(store: AtlasStore, node_id: str) -> dict[str, Any] | None:
    """For a node without a direction: why (coverage.json's reason, with its prompt counts) and the nearest
    analysed ancestor the answer falls back to; None for an analysed node or an atlas without directions."""
    if store.directions is None or node_id in store.analysed_nodes:
        return None
    record = next((r for r in store.coverage if r.get("node") == node_id), None)
    tax = store.taxonomy
    analysed = set(store.analysed_nodes)
    ancestor = record.get("fallback") if record else None
    if ancestor not in analysed and tax is not None and node_id in tax.nodes:
        ancestor = next((a for a in _primary_ancestors(tax, node_id) if a in analysed), None)
    if record and record.get("reason"):
        why = f"not analysed: {record['reason']}"
    else:
        min_prompts = (store.manifest.get("parameters") or {}).get("min_prompts")
        why = (f"not analysed in this run (fewer than {min_prompts if min_prompts is not None else 'min_prompts'} "
               "harmful training prompts)")
    return {"reason": why, "ancestor": ancestor,
            "prompts": {k: record.get(k) for k in ("harmful_prompts", "train_prompts", "used_prompts")}
            if record else None,
            "note": (f"showing the directions of its nearest analysed ancestor {ancestor}" if ancestor else
                     "no ancestor was analysed either")}
