"""Overlap of per-node feature sets: Jaccard, with a bootstrap over prompts as its noise floor.

Each bootstrap replicate resamples every node's prompts with replacement and reselects its K*
latents from the same candidates; from the replicates come (a) the cross-node Jaccard's interval
and (b) each node's self-agreement (Jaccard of a replicate's set with the node's full-data set).
Two nodes' sets are called *distinct* when the cross Jaccard's upper bound lies below both nodes'
self-agreement lower bounds, and *overlapping* when the point Jaccard exceeds the upper bound of the
cross Jaccard expected from two random K*-subsets of their candidate pools.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from refusal_atlas.mechinterp.sae.features import select


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


def _random_floor(cand_a: Tensor, cand_b: Tensor, k: int, n: int, gen: np.random.Generator) -> float:
    """95th percentile Jaccard of two random K*-subsets of the two candidate pools (chance overlap)."""
    a_pool, b_pool = cand_a.numpy(), cand_b.numpy()
    vals = [jaccard(set(gen.choice(a_pool, min(k, len(a_pool)), replace=False).tolist()),
                    set(gen.choice(b_pool, min(k, len(b_pool)), replace=False).tolist())) for _ in range(n)]
    return float(np.quantile(vals, 0.95))


def feature_overlap(attr: dict[str, Tensor], cand: dict[str, Tensor], k: int, *, n_boot: int = 200,
                    seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """(pair table, self-agreement per node): Jaccard of K* sets with bootstrap intervals and floors."""
    nodes = sorted(attr)
    gen = torch.Generator().manual_seed(seed)
    full = {n: set(select(attr[n], cand[n], k).tolist()) for n in nodes}
    boot: dict[str, list[set[int]]] = {n: [] for n in nodes}
    for _ in range(n_boot):
        for n in nodes:
            m = attr[n].shape[0]
            idx = torch.randint(0, m, (m,), generator=gen) if m else torch.zeros(0, dtype=torch.long)
            boot[n].append(set(select(attr[n][idx], cand[n], k).tolist()))
    self_agree = {n: [jaccard(s, full[n]) for s in boot[n]] for n in nodes}
    self_low = {n: float(np.quantile(v, 0.05)) for n, v in self_agree.items()}
    rng = np.random.default_rng(seed)
    rows = []
    for a, b in itertools.combinations(nodes, 2):
        reps = [jaccard(x, y) for x, y in zip(boot[a], boot[b], strict=True)]
        lo, hi = (float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))) if reps else (np.nan, np.nan)
        chance = _random_floor(cand[a], cand[b], k, 500, rng)
        point = jaccard(full[a], full[b])
        rows.append({"node_a": a, "node_b": b, "jaccard": point, "ci_low": lo, "ci_high": hi,
                     "self_a_low": self_low[a], "self_b_low": self_low[b], "chance_95": chance,
                     "distinct": bool(hi < min(self_low[a], self_low[b])), "overlapping": bool(point > chance),
                     "shared": sorted(full[a] & full[b]), "n_boot": n_boot})
    return pd.DataFrame(rows), {n: float(np.median(v)) for n, v in self_agree.items()}


def shared_and_specific(sets: dict[str, set[int]]) -> pd.DataFrame:
    """Per latent: how many nodes selected it and which (shared vs node-specific features)."""
    owners: dict[int, list[str]] = {}
    for node, feats in sets.items():
        for f in feats:
            owners.setdefault(f, []).append(node)
    return pd.DataFrame([{"feature": f, "n_nodes": len(v), "nodes": sorted(v), "shared": len(v) > 1}
                         for f, v in sorted(owners.items())])
