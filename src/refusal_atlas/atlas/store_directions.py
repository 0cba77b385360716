"""The store's view of every direction set of an atlas: the branch set (`directions/`, causally tested) and the
tree set (`directions/tree/`, every other node with enough prompts), as one table per (node, layer, position)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from refusal_atlas.atlas.store_read import as_float
from refusal_atlas.lm.positions import position_label
from refusal_atlas.mechinterp.directions import DirectionSet

__all__ = ["BRANCH_SET", "TREE_SET", "direction_rows", "merge_selection"]

BRANCH_SET = "branches"  # directions/: the largest branches, with the causal tests
TREE_SET = "tree"  # directions/tree/: every other node with enough prompts, diff_means and floors only


def direction_rows(ds: DirectionSet, set_name: str, skip: set[str] | None = None) -> list[dict[str, Any]]:
    """Per (node, layer, position) of diff_means: norm, noise_floor, split_half_p05, reliability, auroc, set."""
    rows = []
    floor = ds.noise.get("diff_means/split_half_mean")
    p05 = ds.noise.get("diff_means/split_half_p05")
    rel = ds.noise.get("diff_means/reliability")
    auroc = ds.meta.get("auroc") or {}
    depth = ds.meta.get("depth") or {}
    for i, node in enumerate(ds.nodes_with_pooled):
        if skip and node in skip:
            continue
        for k, pos in enumerate(ds.positions):
            key = f"diff_means/{node}/{position_label(pos)}"
            if key not in ds.tensors:
                continue
            norms = ds.tensors[key].norm(dim=-1)
            node_auroc = (auroc.get(node) or {}).get(position_label(pos)) or []
            for j, layer in enumerate(ds.layers):
                rows.append({
                    "node": node, "layer": int(layer), "position": position_label(pos), "norm": float(norms[j]),
                    "noise_floor": _cell(floor, i, j, k), "split_half_p05": _cell(p05, i, j, k),
                    "reliability": _cell(rel, i, j, k),
                    "auroc": as_float(node_auroc[j]) if j < len(node_auroc) else None,
                    "set": set_name, "depth": depth.get(node),
                })
    return rows


def merge_selection(df: pd.DataFrame, sel: pd.DataFrame | None) -> pd.DataFrame:
    """Add the causal selection's scores (bypass, induce, KL, selected) where a row was a candidate."""
    if sel is None:
        return df
    cols = ["node", "layer", "position", "bypass_score", "induce_score", "kl_score", "selected"]
    # every-layer ablation's scores: one row per direction (narrower scopes are rows of the same one)
    best = sel.sort_values("selected", ascending=False).drop_duplicates(["node", "layer", "position"])
    return df.merge(best[cols], on=["node", "layer", "position"], how="left")


def _cell(t: Tensor | None, i: int, j: int, k: int) -> float | None:
    if t is None:
        return None
    value = float(t[i, j, k])
    return None if np.isnan(value) else value
