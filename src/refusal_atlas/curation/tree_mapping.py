"""The cluster tree against the taxonomy tree: a coarse level ↔ the taxonomy's branches, the leaves ↔ its nodes.

`map_clusters` links the leaves (the flat `cluster` column) to nodes. This module adds the other end of the
tree: the level whose clusters correspond to the taxonomy's branches (its roots), each of that level's
clusters linked to a branch, and how well each level agrees with branches and with nodes.

* **Which level is scored.** A level is compared with a grouping (branches or nodes of the rows that carry a
  node label) where the *scored rows* fall into the number of clusters closest to the number of groups they
  hold (the finer level on a tie). Clusters holding only unlabelled rows do not count: with them a level
  could match the count while merging two of the groups being scored. Without labels, the branch level is
  the one closest to the number of distinct branches the fitting leaves were linked to.
* **Which branch a cluster of that level is.** As for leaves: the branch most of its labelled rows belong
  to when at least half its rows are labelled (`label_majority`, score = that share), else the cosine of its
  centroid to the mean of the branch's node vectors, root and descendants (`similarity`). The thresholds are
  `map_clusters`'s, so "fits" means the same at both ends of the tree.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from refusal_atlas.curation.cluster import OUTLIER
from refusal_atlas.curation.cluster_store import ClusterRun
from refusal_atlas.curation.embed import TextEmbedder, make_embedder
from refusal_atlas.curation.mapping import (
    branch_support,
    description_vectors,
    nearest_branches,
    node_vectors,
    primary_nodes,
)
from refusal_atlas.taxonomy.model import Taxonomy

__all__ = ["closest_level", "level_ari", "map_tree", "tree_vs_taxonomy"]


def _level_labels(run: ClusterRun, i: int) -> np.ndarray:
    return run.assignments[f"cluster_level_{i}"].to_numpy()


def _n_levels(run: ClusterRun) -> int:
    levels = (run.meta.get("tree") or {}).get("levels") or []
    return sum(1 for i in range(len(levels)) if f"cluster_level_{i}" in run.assignments.columns)


def closest_level(run: ClusterRun, k: int, rows: np.ndarray | None = None) -> int:
    """Index of the tree level where `rows` (all rows if None) fall into the number of clusters closest to `k`
    (the finer level on a tie)."""
    counts = []
    for i in range(_n_levels(run)):
        labels = _level_labels(run, i)
        counts.append(len(set((labels if rows is None else labels[rows]).tolist()) - {OUTLIER}))
    return min(range(len(counts)), key=lambda i: (abs(counts[i] - k), -i))


def level_ari(run: ClusterRun, truth: pd.Series) -> dict[str, Any]:
    """ARI against `truth` (rows where it is non-empty) at the level closest to its number of groups."""
    has = (truth.astype(str).str.len() > 0).to_numpy()
    if has.sum() < 2 or not _n_levels(run):
        return {"ari": None, "n": int(has.sum())}
    k = int(truth[has].nunique())
    i = closest_level(run, k, has)
    labels = _level_labels(run, i)[has]
    return {"ari": float(adjusted_rand_score(truth[has].astype(str), labels)), "n": int(has.sum()), "groups": k,
            "level": i, "n_clusters": len(set(labels.tolist()) - {OUTLIER})}


def _row_truth(run: ClusterRun, taxonomy: Taxonomy) -> tuple[pd.Series, pd.Series]:
    """Per row: its primary node (known to the taxonomy, else "") and that node's branch."""
    node = pd.Series([n if n in taxonomy.nodes else "" for n in primary_nodes(run)], dtype=object)
    branch = node.map(lambda n: taxonomy.branch_of(n) if n else "")
    return node, branch


def tree_vs_taxonomy(run: ClusterRun, taxonomy: Taxonomy) -> dict[str, Any]:
    """The tree against the rows' branches and nodes (rows with a known node), each at its scored level."""
    node, branch = _row_truth(run, taxonomy)
    return {"branch": level_ari(run, branch), "node": level_ari(run, node)}


def _branch_vectors(taxonomy: Taxonomy, embedder: TextEmbedder) -> tuple[list[str], np.ndarray]:
    """One unit vector per branch: the mean of its nodes' vectors (root and descendants), since a coarse
    cluster covers the branch's topics, not only the root's own description."""
    ids, vecs = node_vectors(taxonomy, embedder)
    by_branch: dict[str, list[int]] = {}
    for j, nid in enumerate(ids):
        by_branch.setdefault(taxonomy.branch_of(nid), []).append(j)
    roots = sorted(by_branch)
    out = [vecs[by_branch[r]].mean(0) for r in roots]
    out = [v / (np.linalg.norm(v) or 1.0) for v in out]
    return roots, (np.stack(out) if out else np.zeros((0, vecs.shape[1]), np.float32))


def map_tree(run: ClusterRun, taxonomy: Taxonomy, leaf_branches: list[str], thresholds: dict[str, float],
             embedder: TextEmbedder | None = None) -> dict[str, Any]:
    """The `tree` entry of mapping.json: per level its agreement with branches and nodes, and the branch level's
    clusters each linked to a branch. `leaf_branches`: the branches of the leaves that fit a node (the level
    rule when no row is labelled)."""
    n_levels = _n_levels(run)
    if not n_levels:
        return {}
    node, branch = _row_truth(run, taxonomy)
    labelled = (branch.str.len() > 0).to_numpy()
    levels = []
    for i in range(n_levels):
        labels = _level_labels(run, i)
        entry: dict[str, Any] = {"level": i, "n_clusters": len(set(labels.tolist()) - {OUTLIER})}
        if labelled.sum() > 1:
            entry["ari_branch"] = float(adjusted_rand_score(branch[labelled], labels[labelled]))
            entry["ari_node"] = float(adjusted_rand_score(node[labelled], labels[labelled]))
        levels.append(entry)
    if labelled.sum() > 1:
        scored = level_ari(run, branch)
        level, rule = int(scored["level"]), "labelled rows: their branches"
    else:
        k = len(set(leaf_branches)) or 1
        scored = {"ari": None, "n": 0}
        level, rule = closest_level(run, k), f"no labelled rows: {k} branch(es) the fitting leaves link to"
    labels = _level_labels(run, level)
    vec_ids: list[str] = []
    vecs: np.ndarray | None = None
    rows_branch: np.ndarray | None = None
    clusters = []
    for c in sorted(set(labels.tolist()) - {OUTLIER}):
        idx = np.flatnonzero(labels == c)
        known = [b for b in branch.iloc[idx].tolist() if b]
        if len(known) * 2 >= len(idx):
            best, count = sorted(Counter(known).items(), key=lambda kv: (-kv[1], kv[0]))[0]
            score, method = count / len(idx), "label_majority"
        else:
            if vecs is None:
                vec_ids, vecs = _branch_vectors(taxonomy, embedder or make_embedder(
                    run.meta.get("embedder", {}).get("model")))
            if not len(vecs):
                continue
            centroid = description_vectors(run, embedder)[idx].mean(0)
            sims = vecs @ (centroid / (np.linalg.norm(centroid) or 1.0))
            order = np.lexsort((np.asarray(vec_ids), -sims))
            best, score, method = vec_ids[int(order[0])], float(sims[order[0]]), "similarity"
            # a broad cluster's centroid sits between topics, so its cosines run lower than a leaf's: the
            # runner-up says whether the pick is clear even where the score misses the threshold
            runner = ({"branch": vec_ids[int(order[1])], "score": round(float(sims[order[1]]), 4)}
                      if len(order) > 1 else None)
        entry = {"cluster": int(c), "size": len(idx), "branch": best, "score": round(float(score), 4),
                 "method": method, "fits": bool(score >= thresholds[method])}
        if method == "similarity":
            entry["runner_up"] = runner
            if rows_branch is None:
                emb = embedder or make_embedder(run.meta.get("embedder", {}).get("model"))
                node_ids, node_vecs = node_vectors(taxonomy, emb)
                rows_branch = nearest_branches(description_vectors(run, embedder), node_ids, node_vecs, taxonomy)
            entry["branch_support"] = branch_support(rows_branch == best, idx, best)
            entry["fits"] = entry["fits"] and entry["branch_support"]["focused"]
        clusters.append(entry)
    return {"branch_level": {"level": level, "n_clusters": len(clusters), "rule": rule, "ari": scored.get("ari"),
                             "n": scored.get("n"), "groups": scored.get("groups"), "clusters": clusters},
            "node_level": level_ari(run, node), "levels": levels}
