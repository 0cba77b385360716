"""What a clustering run reports beyond its flat labels: the tree's levels, and warnings when it found nothing.

`tree_summary` is the `tree` entry of clusters.json: per level (coarse to fine) its cluster
count, seed-to-seed ARI, and per cluster its size, parent in the next coarser level and
c-TF-IDF keywords. `empty_warnings` turns a run that clustered nothing, or left most rows
outliers, into a warning naming the `min_cluster_size` a sweep suggests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from refusal_atlas.curation.cluster import OUTLIER, ClusterConfig, ClusterPipeline, ClusterResult
from refusal_atlas.curation.cluster_describe import ctfidf_keywords
from refusal_atlas.curation.stability import min_cluster_size_sweep, rescue_sweep, suggest_min_cluster_size

FLAT_RULE = ("flat `cluster` = the leaves: HDBSCAN (excess of mass) consensus clusters, where every cluster holding "
             "more than max_flat_share of the fitted rows is clustered again on its own rows (split_depth deep) and "
             "replaced by its parts when they are at least two (rows no part takes are a part when they are a "
             "kNN-connected group of min_cluster_size); repeated texts are leaves of their own")
MAX_OUTLIERS = 0.5


def _parents(coarse: np.ndarray, fine: np.ndarray) -> dict[int, int]:
    """Each fine cluster's cluster in the coarser level (levels are nested: any member row tells)."""
    out: dict[int, int] = {}
    for c in sorted(set(fine.tolist()) - {OUTLIER}):
        out[c] = int(coarse[np.flatnonzero(fine == c)[0]])
    return out


def tree_summary(result: ClusterResult, texts: Sequence[str], stability: dict | None,
                 n_keywords: int = 5) -> dict[str, Any]:
    level_stab = {int(e["n_clusters"]): e["pairwise_ari"]
                  for e in ((stability or {}).get("seeds", {}).get("levels") or [])}
    levels = []
    for i, (count, labels) in enumerate(zip(result.level_counts, result.levels, strict=True)):
        words = ctfidf_keywords(texts, labels, n_keywords)
        parents = _parents(result.levels[i - 1], labels) if i else {}
        sizes = np.bincount(labels[labels != OUTLIER]) if (labels != OUTLIER).any() else np.zeros(0, dtype=int)
        levels.append({
            "level": i, "n_clusters": int(count), "column": f"cluster_level_{i}",
            "seed_ari": level_stab.get(int(count)),
            "clusters": [{"id": c, "size": int(sizes[c]), "parent": parents.get(c),
                          "keywords": words.get(c, [])} for c in range(len(sizes))],
        })
    return {"rule": FLAT_RULE, "flat_level": result.flat_level, "n_leaves": result.tree.n_leaves if result.tree else 0,
            "verbatim_leaves": result.verbatim_leaves, "levels": levels}


def empty_warnings(result: ClusterResult, config: ClusterConfig, x: np.ndarray, texts: Sequence[str],
                   stability: dict | None) -> list[str]:
    """A warning when nothing is clustered or more than half the rows are outliers (else none)."""
    if result.n_clusters and result.outlier_fraction <= MAX_OUTLIERS:
        return []
    mcs = ClusterPipeline(config).min_size(len(texts))
    values = rescue_sweep(mcs)
    rows = [r for r in ((stability or {}).get("min_cluster_size_sweep") or []) if r["min_cluster_size"] in values]
    done = {r["min_cluster_size"] for r in rows}
    todo = [v for v in values if v not in done and v != config.min_cluster_size]
    if todo:
        rows += min_cluster_size_sweep(config, x, texts, todo)
    if result.n_clusters:
        rows.append({"min_cluster_size": config.min_cluster_size, "n_clusters": result.n_clusters,
                     "outlier_fraction": result.outlier_fraction})
    head = (f"{len(texts)} rows gave {result.n_clusters} clusters with {result.outlier_fraction:.0%} outliers at "
            f"min_cluster_size {mcs}")
    best = suggest_min_cluster_size(rows, MAX_OUTLIERS)
    tried = ", ".join(str(v) for v in sorted({r["min_cluster_size"] for r in rows}))
    if best is None and not tried:  # already at the smallest size a cluster can have
        return [f"{head}, the smallest size there is: the texts are too few or too dissimilar to group"]
    if best is None:
        return [f"{head}; no min_cluster_size in the sweep ({tried}) gives a cluster: the texts are too few or too "
                "dissimilar to group"]
    if best["min_cluster_size"] == mcs:
        return [f"{head}; the sweep ({tried}) does no better: most rows are too dissimilar to group"]
    return [f"{head}; the min_cluster_size sweep ({tried}) suggests --min-cluster-size {best['min_cluster_size']} "
            f"({best['n_clusters']} clusters, {best['outlier_fraction']:.0%} outliers)"]
