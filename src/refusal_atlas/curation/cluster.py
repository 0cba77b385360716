"""Stable clustering of texts: near-duplicate collapse → kNN graph → UMAP (several seeds) → HDBSCAN → consensus
→ large clusters split on their own rows → leaves → a Ward tree of the leaves, cut into levels.

Why this design (measured on the 1,652 pooled HarmBench + StrongREJECT + Do-Not-Answer prompts
with MiniLM; numbers in benchmarks/results/cluster_bench.md):

* A plain seeded UMAP → HDBSCAN run (what BERTopic does) agrees with itself across seeds only at
  ARI ≈ 0.76. Comparing two runs shows the *cores* of the clusters agree (ARI ≈ 0.99 on the rows
  both runs cluster); what moves is which rows fall into the outlier bucket, and whether a
  borderline group is a cluster at all. A deterministic reduction instead (PCA → HDBSCAN) is
  stable but useless (2–3 clusters): UMAP's layout is what makes the density structure visible.
* So we keep UMAP → HDBSCAN but take a *consensus* over several seeds. The exact cosine kNN graph
  is computed once (deterministic, input sorted by content hash, so row order never matters)
  and shared by every UMAP layout, as is the spectral initialisation computed from it; only the
  layout optimisation (100 epochs) varies with the seed. Each layout is clustered by HDBSCAN; on
  the kNN edges we count how often both ends share a cluster (co-association). Edges kept by more
  than `consensus_threshold` (0.7) of the runs, whose ends also share `consensus_support` (2) kept
  neighbours, form the consensus cores (connected components ≥ `min_cluster_size`, rows clustered by
  most runs); the support keeps one chain of edges from joining two cores in some blocks of seeds only.
* The outlier decision is then taken on the deterministic kNN graph, not per seed: an
  unassigned row joins the cluster that holds the plurality and more than `neighbour_share`
  (0.3, i.e. at least 5) of its 15 nearest neighbours; it stays an outlier (-1) otherwise.
  Measured on the raw labels of 60 seeded layouts regrouped into disjoint consensus blocks: the
  residual disagreement between consensus runs is almost all outlier status (cores agree at
  ARI 0.97–0.99), so the outlier rule and the number of layouts are the levers. Seed-to-seed ARI
  (mean / min over block pairs): 5 layouts, threshold 0.5, share 0.34 (the previous default)
  0.89 / 0.81; 10 layouts at 50 epochs 0.88; 10 layouts at 100 epochs 0.91 / 0.89; threshold 0.7
  and share 0.3 with 5 layouts 0.93 / 0.90, with 8 layouts 0.94 / 0.92, with 10 0.96 / 0.94.
  HDBSCAN on co-association distances instead of the threshold rule: 0.90. 8 layouts gave 0.937 / 0.909
  over 10 seed blocks (5 % outliers, 38 clusters; BERTopic and plain UMAP → HDBSCAN 0.76 / 0.66 with 15 %
  outliers); the default is 24 with supported edges, which keeps the coarser tree levels stable too
  (docs/decisions.md, "Twelve layouts" and "Supported consensus edges").
* Near-duplicates (cosine ≥ `dedup_threshold`, see `dedup`) are collapsed to one representative
  before fitting and copy its cluster afterwards, so a prompt re-worded 30 times counts once and
  templated corpora no longer yield one cluster per prompt family: 6,000 re-wordings of 400
  HarmBench prompts give 8 clusters (the 400 prompts alone: 3; without the collapse 378, BERTopic
  390); 50,000 re-wordings of all 1,652 pooled prompts give 65 (pooled: 38; BERTopic 1,640). On
  the pooled prompts it merges 29 of 1,652 rows (duplicates and close paraphrases).
* ARI ≥ 0.5 against the pooled source:category labels is out of reach for clusterings of MiniLM
  embeddings (all pipelines ≈ 0.3; k-means / Ward / average linkage at k = 6..35 ≤ 0.29); even a
  supervised, cross-validated logistic regression on the same embeddings reaches only 0.54–0.63.
* Large corpora: at most `max_fit` representatives are fitted (the first ones in content-hash
  order, a deterministic pseudo-random sample) and every other row takes the majority cluster
  of its nearest fitted neighbours, so memory and time stay flat in n.
* Tiny corpora (fewer rows than `n_neighbors + 1`) cannot run UMAP; they fall back to
  deterministic average-linkage agglomerative clustering on cosine distance.
* One density cut keeps a broad region whole when its parts are less dense than the gaps around
  it (400 HarmBench prompts: 3 clusters, 75 % in one). So every consensus cluster holding more than
  `max_flat_share` (25 %) of the fitted rows is clustered again on its own rows (its own kNN graph
  and layouts), `split_depth` deep, and replaced by its parts when there are at least two (a
  group of at least `min_cluster_size` rows that no part took, kNN-connected, is a part too). The
  result, plus one leaf per text repeated `verbatim_min` times, are the *leaves* and the flat
  `cluster` column; `cluster_tree` merges them into coarser levels (HarmBench: ARI 0.63 at 7
  clusters, seed ARI 0.93; docs/decisions.md, "Clustering").
* Same input and seed give the same labels whatever the cache state or thread count: the input
  is rounded to float16 (`embed_cache.quantise`, as every embedder returns it), kNN distances to a
  1/128 grid with ties in index order, and the shared UMAP start to a 0.05 grid (umap-learn seeds
  each point's negative sampling from the bits of its start coordinate, so float noise there
  acted like a new seed). Embeddings perturbed at 1e-6 give identical labels.

Stages are small objects with `fit`/`fit_predict`-style methods so any can be swapped (a
different reducer or clusterer) without touching the rest; `ClusterPipeline` wires them.
Outliers are label -1 and stay -1 unless `reassign_outliers` is set (then the change is
logged and recorded per row).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from refusal_atlas.curation.cluster_describe import centroids, ctfidf_keywords, representatives
from refusal_atlas.curation.cluster_stages import (
    OUTLIER,
    AgglomerativeFallback,
    ClusterConfig,
    Clusterer,
    Consensus,
    ExactKnn,
    HdbscanClusterer,
    KnnGraph,
    Reducer,
    UmapReducer,
    knn_search,
    neighbour_majority,
    propagate,
    supported_edges,
)
from refusal_atlas.curation.cluster_tree import ClusterTree, build_tree, level_counts
from refusal_atlas.curation.dedup import Collapse, collapse_near_duplicates
from refusal_atlas.curation.embed_cache import quantise
from refusal_atlas.hashing import text_sha256

__all__ = [
    "OUTLIER",
    "AgglomerativeFallback",
    "ClusterConfig",
    "ClusterPipeline",
    "ClusterResult",
    "ClusterTree",
    "Clusterer",
    "Consensus",
    "ExactKnn",
    "HdbscanClusterer",
    "KnnGraph",
    "Reducer",
    "UmapReducer",
    "canonical_order",
    "centroids",
    "ctfidf_keywords",
    "knn_search",
    "propagate",
    "reassign_outliers",
    "representatives",
    "verbatim_groups",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the pipeline


@dataclass
class ClusterResult:
    """Labels per input row (input order), the cluster tree, and everything needed to describe the clusters."""

    labels: np.ndarray  # the flat resolution: `levels[flat_level]`
    confidence: np.ndarray
    reassigned: np.ndarray
    fitted: np.ndarray  # bool: the row was fitted (a representative; others copy theirs or are kNN-assigned)
    keywords: dict[int, list[str]]
    representatives: dict[int, list[int]]
    layout_2d: np.ndarray | None
    method: str
    config: ClusterConfig
    timings: dict[str, float] = field(default_factory=dict)
    seed_runs: np.ndarray | None = None  # m × n_fit raw per-seed labels (canonical order of the fit set)
    # per row: input position of the representative whose cluster it copies (itself when fitted),
    # -1 when it was assigned from its nearest fitted rows instead (beyond `max_fit` representatives)
    representative: np.ndarray | None = None
    tree: ClusterTree | None = None
    level_counts: list[int] = field(default_factory=list)  # cluster count of each level, coarse to fine
    levels: list[np.ndarray] = field(default_factory=list)  # per level, labels per row (coarse to fine)
    flat_level: int = 0
    verbatim_leaves: int = 0  # leaves that are one text repeated at least `verbatim_min` times

    @property
    def n_clusters(self) -> int:
        return len(set(self.labels.tolist()) - {OUTLIER})

    @property
    def outlier_fraction(self) -> float:
        return float((self.labels == OUTLIER).mean()) if len(self.labels) else 0.0

    def sizes(self) -> dict[int, int]:
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def cut(self, k: int) -> np.ndarray:
        """Labels with (at most) `k` clusters from this run's tree; the flat labels if there is no tree."""
        return self.tree.cut(k) if self.tree is not None else self.labels


def canonical_order(texts: Sequence[str]) -> np.ndarray:
    """A permutation that sorts rows by (content hash, text, position): the same set in any order fits the same."""
    keys = [text_sha256(t) for t in texts]
    return np.asarray(sorted(range(len(texts)), key=lambda i: (keys[i], texts[i], i)), dtype=np.int64)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows as float32; input that already is (the embedder's output) is returned without a copy."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-3):
        return x
    return x / np.where(norms == 0, 1.0, norms)


def verbatim_groups(texts: Sequence[str], order: np.ndarray, min_copies: int) -> list[np.ndarray]:
    """Rows of each text that occurs at least `min_copies` times (groups in canonical order of their first row).

    Identical texts are one answer given many times (a model's stock refusal, a templated
    wording): how often it was given is the finding, and such a group is a leaf of the tree
    however close its embedding is to another stock answer's ("I don't assist with X" vs "... Y").
    """
    rows_of: dict[str, list[int]] = {}
    for pos in order.tolist():
        rows_of.setdefault(texts[pos], []).append(pos)
    return [np.asarray(r, dtype=np.int64) for r in rows_of.values() if len(r) >= max(2, min_copies)]


class ClusterPipeline:
    """kNN → UMAP × seeds → HDBSCAN → consensus leaves (+ verbatim leaves) → Ward tree → levels + flat labels."""

    def __init__(self, config: ClusterConfig | None = None, *, reducer: Reducer | None = None,
                 clusterer: Clusterer | None = None) -> None:
        self.config = config or ClusterConfig()
        c = self.config
        self.reducer = reducer or UmapReducer(c.n_components, c.min_dist, c.n_epochs, init_grid=c.init_grid)
        self._clusterer = clusterer

    def min_size(self, n_fit: int) -> int:
        """`min_cluster_size`, raised to `min_cluster_fraction` of the fitted rows when that is set.

        A fraction gives fewer, larger clusters on big corpora; templated corpora are handled by the
        near-duplicate collapse instead (a fraction left most of their rows outliers).
        """
        c = self.config
        return max(c.min_cluster_size, int(np.ceil(c.min_cluster_fraction * n_fit)))

    def fit_labels(self, x: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict]:
        """Flat labels and confidence for rows in *input order*; no keywords (used by stability checks)."""
        res = self._fit(x, texts, describe=False)
        return res.labels, res.confidence, res.timings

    def fit_tree(self, x: np.ndarray, texts: Sequence[str]) -> ClusterResult:
        """The whole result (tree and levels included) without keywords, representatives or 2-D map."""
        return self._fit(x, texts, describe=False)

    def fit(self, x: np.ndarray, texts: Sequence[str]) -> ClusterResult:
        return self._fit(x, texts, describe=True)

    def _fit_leaves(self, xf: np.ndarray, timings: dict[str, float], weights: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, str, KnnGraph | None, np.ndarray | None]:
        """Consensus leaf labels of the fitted rows (canonical order), confidence, method, graph, seed runs.

        `weights`: rows each fitted row stands for (its near-duplicates); only the small-corpus fallback
        reads them (a density clustering of representatives is meant not to count re-wordings, see `dedup`)."""
        c = self.config
        n_fit = len(xf)
        if n_fit == 0:
            return (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), "verbatim-only", None, None)
        if n_fit < c.n_neighbors + 2:
            t = time.perf_counter()
            labels_f = AgglomerativeFallback(c.fallback_distance, max(2, min(c.min_cluster_size, 2))
                                             ).fit_predict(xf, weights, self.min_size(int(weights.sum()))
                                                           if weights is not None else None)
            timings["cluster_s"] = time.perf_counter() - t
            return labels_f, (labels_f != OUTLIER).astype(np.float32), "agglomerative-fallback", None, None
        t = time.perf_counter()
        knn = ExactKnn(c.n_neighbors, c.distance_grid).fit(xf)
        timings["knn_s"] = time.perf_counter() - t
        runs = []
        t = time.perf_counter()
        mcs = self.min_size(n_fit)
        clusterer = self._clusterer or HdbscanClusterer(mcs, c.min_samples, c.selection)
        for seed in c.seeds:
            y = self.reducer.fit_transform(xf, knn, seed)
            runs.append(clusterer.fit_predict(y))
        timings["umap_hdbscan_s"] = time.perf_counter() - t
        t = time.perf_counter()
        seed_runs = np.asarray(runs)
        consensus = Consensus(c.consensus_threshold, mcs, c.neighbour_share, c.consensus_support)
        labels_f, conf_f = consensus.combine(seed_runs, knn)
        timings["consensus_s"] = time.perf_counter() - t
        return labels_f, conf_f, "consensus-umap-hdbscan", knn, seed_runs

    def _split_large(self, xf: np.ndarray, labels: np.ndarray, depth: int) -> np.ndarray:
        """Re-cluster every cluster larger than `max_flat_share` of the fitted rows on its own rows (recursively).

        One density cut over the whole corpus keeps a broad region as one cluster when its parts are
        less dense than the gaps around it (400 HarmBench prompts: 75 % in one cluster); a layout of
        that region alone separates its parts. A cluster is replaced by its parts when they are at
        least two; its rows that no part takes form parts of their own where they are a group
        (`_outlier_groups`), and otherwise join the part holding most of their nearest neighbours (they
        were clustered one level up, so they do not become outliers here).
        """
        c = self.config
        labels = labels.copy()
        limit = max(c.max_flat_share * len(xf), 2 * self.min_size(len(xf)), c.n_neighbors + 2)
        next_id = int(labels.max()) + 1 if len(labels) else 0
        for cid in sorted(set(labels.tolist()) - {OUTLIER}):
            members = np.flatnonzero(labels == cid)
            if len(members) <= limit:
                continue
            sub, _, method, _, _ = self._fit_leaves(xf[members], {})
            if method != "consensus-umap-hdbscan":
                continue
            sub = self._outlier_groups(xf[members], sub)
            if len(set(sub.tolist()) - {OUTLIER}) < 2:
                continue
            if depth > 1:
                sub = self._split_large(xf[members], sub, depth - 1)
            out = np.flatnonzero(sub == OUTLIER)
            if len(out):
                inside = np.flatnonzero(sub != OUTLIER)
                idx, _ = knn_search(xf[members[out]], xf[members[inside]], min(c.n_neighbors, len(inside)))
                sub[out], _ = neighbour_majority(sub[inside][idx])
            ids = sorted(set(sub.tolist()))
            for j, s_id in enumerate(ids):
                labels[members[sub == s_id]] = next_id + j
            next_id += len(ids)
        return labels

    def _outlier_groups(self, xm: np.ndarray, sub: np.ndarray) -> np.ndarray:
        """`sub` with each kNN-connected group of its outliers that is a cluster's size as a part of its own.

        Inside a cluster being split, a part that HDBSCAN calls noise in about half of the layouts (a looser
        group beside two tight ones) falls below the consensus threshold as a whole; handing its rows to the
        nearest *other* part would merge two groups. Rows the parts did not take, joined by supported kNN
        edges among themselves (as consensus edges are), form a part when the group holds `min_size` rows.
        """
        c = self.config
        out = np.flatnonzero(sub == OUTLIER)
        need = self.min_size(len(xm))
        if len(out) < need:
            return sub
        k = min(c.n_neighbors, len(xm) - 1)
        idx, _ = knn_search(xm, xm, k, exclude_self=True)
        is_out = sub == OUTLIER
        rows = np.repeat(out, k)
        cols = idx[out].ravel()
        keep = is_out[cols]
        graph = sp.coo_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(len(xm), len(xm)))
        graph = supported_edges(graph, min(c.consensus_support, need - 2))
        _, comp = connected_components(graph, directed=False)
        sub = sub.copy()
        next_id = int(sub.max()) + 1
        for part in np.unique(comp[out]):
            group = out[comp[out] == part]
            if len(group) >= need:
                sub[group] = next_id
                next_id += 1
        return sub

    def _fit(self, x: np.ndarray, texts: Sequence[str], *, describe: bool) -> ClusterResult:
        c = self.config
        texts = list(texts)
        if len(texts) != len(x):
            raise ValueError(f"{len(texts)} texts but {len(x)} embeddings")
        if not texts:
            raise ValueError("nothing to cluster")
        timings: dict[str, float] = {}
        # float16 precision, as the embedders return it: noise far below a float16 step (another thread
        # count, a different BLAS) rounds back to the same vectors
        x = quantise(_normalise(x))
        n = len(texts)
        order = canonical_order(texts)
        verbatim = verbatim_groups(texts, order, c.verbatim_min or self.min_size(n))
        in_verbatim = np.zeros(n, dtype=bool)
        for rows in verbatim:
            in_verbatim[rows] = True
        rest_order = order[~in_verbatim[order]]
        t = time.perf_counter()
        collapse = (collapse_near_duplicates(x, c.dedup_threshold, c.max_fit, order=rest_order) if len(rest_order)
                    else Collapse(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)))
        fit_pos = rest_order[collapse.representatives]
        timings["dedup_s"] = time.perf_counter() - t
        xf = x[fit_pos]
        n_fit = len(fit_pos)
        scanned_group = collapse.group[collapse.group >= 0]
        weights = np.bincount(scanned_group, minlength=n_fit).astype(np.float64)
        labels_f, conf_f, method, knn, seed_runs = self._fit_leaves(xf, timings, weights)
        if method == "consensus-umap-hdbscan" and c.split_depth > 0:
            t = time.perf_counter()
            labels_f = self._split_large(xf, labels_f, c.split_depth)
            timings["split_s"] = time.perf_counter() - t
        layout = None
        if describe and c.layout_2d and knn is not None:
            t = time.perf_counter()
            layout = UmapReducer(2, 0.1, c.n_epochs, init_grid=c.init_grid).fit_transform(
                xf, knn, c.seeds[0] if c.seeds else 0)
            timings["layout_2d_s"] = time.perf_counter() - t

        leaves = np.full(n, OUTLIER, dtype=np.int64)
        confidence = np.zeros(n, dtype=np.float32)
        fitted = np.zeros(n, dtype=bool)
        fitted[fit_pos] = True
        # Near-duplicates copy their representative's cluster (and map position).
        scanned = collapse.group >= 0
        copied, src = rest_order[scanned], collapse.group[scanned]
        representative = np.full(n, -1, dtype=np.int64)
        representative[copied] = fit_pos[src]
        leaves[copied], confidence[copied] = labels_f[src], conf_f[src]
        layout_all = None
        if layout is not None:
            layout_all = np.zeros((n, 2), dtype=np.float32)
            layout_all[copied] = layout[src]
        if (~scanned).any() and n_fit:
            t = time.perf_counter()
            rest = rest_order[~scanned]
            idx, sims = knn_search(x[rest], xf, min(c.n_neighbors, n_fit))
            leaves[rest], confidence[rest] = neighbour_majority(labels_f[idx])
            if layout_all is not None and layout is not None:
                w = np.maximum(sims, 1e-6)
                layout_all[rest] = (layout[idx] * w[..., None]).sum(1) / w.sum(1, keepdims=True)
            timings["assign_rest_s"] = time.perf_counter() - t
        # Verbatim groups: a leaf each, numbered after the fitted leaves; on the map, beside their nearest fitted row.
        next_id = int(leaves.max()) + 1 if (leaves != OUTLIER).any() else 0
        for j, rows in enumerate(verbatim):
            leaves[rows], confidence[rows] = next_id + j, 1.0
            representative[rows] = rows[0]
            if layout_all is not None and layout is not None:
                near, _ = knn_search(x[rows[:1]], xf, 1)
                layout_all[rows] = layout[near[0, 0]]

        reassigned = np.zeros(n, dtype=bool)
        if c.reassign_outliers:
            reassigned = reassign_outliers(x, leaves, c.reassign_min_similarity)
        t = time.perf_counter()
        tree = build_tree(x, leaves)
        counts = level_counts(tree.n_leaves, c.level_ratio)
        levels = tree.levels(counts)
        flat = len(levels) - 1  # the leaves (see FLAT_RULE in cluster_levels)
        labels = levels[flat]
        timings["tree_s"] = time.perf_counter() - t
        keywords: dict[int, list[str]] = {}
        reps: dict[int, list[int]] = {}
        if describe:
            t = time.perf_counter()
            keywords = ctfidf_keywords(texts, labels, c.n_keywords)
            reps = representatives(x, labels, texts, c.n_representatives)
            timings["describe_s"] = time.perf_counter() - t
        return ClusterResult(labels=labels, confidence=confidence, reassigned=reassigned, fitted=fitted,
                             keywords=keywords, representatives=reps, layout_2d=layout_all, method=method,
                             config=c, timings=timings, seed_runs=seed_runs, representative=representative,
                             tree=tree, level_counts=counts, levels=levels, flat_level=flat,
                             verbatim_leaves=len(verbatim))


def reassign_outliers(x: np.ndarray, labels: np.ndarray, min_similarity: float = 0.5) -> np.ndarray:
    """Move outliers to the nearest cluster centroid when cosine ≥ min_similarity (in place); logged.

    Returns a boolean mask of the rows that moved, which is stored with the assignments so a
    reassigned row is never mistaken for a core member.
    """
    cents = centroids(x, labels)
    moved = np.zeros(len(labels), dtype=bool)
    outl = np.flatnonzero(labels == OUTLIER)
    if not cents or not len(outl):
        return moved
    ids = np.asarray(list(cents))
    sims = x[outl] @ np.stack([cents[c] for c in ids]).T
    best = sims.argmax(1)
    ok = sims[np.arange(len(outl)), best] >= min_similarity
    labels[outl[ok]] = ids[best[ok]]
    moved[outl[ok]] = True
    log.info("reassigned %d of %d outliers to their nearest cluster (cosine >= %.2f)",
             int(ok.sum()), len(outl), min_similarity)
    return moved
