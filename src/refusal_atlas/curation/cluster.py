"""Stable clustering of texts: near-duplicate collapse → kNN graph → UMAP (several seeds) → HDBSCAN → consensus.

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
  than `consensus_threshold` (0.7) of the runs form the consensus cores (connected components ≥
  `min_cluster_size`, rows clustered by most runs).
* The outlier decision is then taken on the deterministic kNN graph, not per seed: an
  unassigned row joins the cluster that holds the plurality and more than `neighbour_share`
  (0.3, i.e. at least 5) of its 15 nearest neighbours; it stays an outlier (-1) otherwise.
  Measured on the raw labels of 60 seeded layouts regrouped into disjoint consensus blocks: the
  residual disagreement between consensus runs is almost all outlier status (cores agree at
  ARI 0.97–0.99), so the outlier rule and the number of layouts are the levers. Seed-to-seed ARI
  (mean / min over block pairs): 5 layouts, threshold 0.5, share 0.34 (the previous default)
  0.89 / 0.81; 10 layouts at 50 epochs 0.88; 10 layouts at 100 epochs 0.91 / 0.89; threshold 0.7
  and share 0.3 with 5 layouts 0.93 / 0.90, with 8 layouts 0.94 / 0.92, with 10 0.96 / 0.94.
  HDBSCAN on co-association distances instead of the threshold rule: 0.90. Default: 8 layouts
  (full pipeline over 10 seed blocks: 0.937 / 0.909, 5 % outliers, 38 clusters); BERTopic and
  plain UMAP → HDBSCAN score 0.76 / 0.66 with 15 % outliers.
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

Stages are small objects with `fit`/`fit_predict`-style methods so any can be swapped (a
different reducer or clusterer) without touching the rest; `ClusterPipeline` wires them.
Outliers are label -1 and stay -1 unless `reassign_outliers` is set (then the change is
logged and recorded per row).
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from refusal_atlas.curation.dedup import collapse_near_duplicates

log = logging.getLogger(__name__)

OUTLIER = -1


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ClusterConfig:
    """Every knob of a clustering run; stored verbatim in clusters.json."""

    n_neighbors: int = 15
    n_components: int = 5
    min_dist: float = 0.0
    n_epochs: int = 100
    min_cluster_size: int = 10
    min_cluster_fraction: float = 0.0  # > 0: clusters must also hold this share of the fitted rows
    min_samples: int | None = 5
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    consensus_threshold: float = 0.7
    neighbour_share: float = 0.3
    max_fit: int = 5000
    dedup_threshold: float = 0.85  # cosine at which rows collapse into one representative (>= 1: off)
    reassign_outliers: bool = False
    reassign_min_similarity: float = 0.5
    n_keywords: int = 10
    n_representatives: int = 5
    fallback_distance: float = 0.6
    layout_2d: bool = True

    def with_seed_base(self, base: int) -> ClusterConfig:
        """The same config with a disjoint block of seeds (used by stability checks)."""
        m = len(self.seeds)
        return ClusterConfig(**{**asdict(self), "seeds": tuple(base * 1000 + j for j in range(m))})

    def to_dict(self) -> dict:
        out = asdict(self)
        out["seeds"] = list(self.seeds)
        return out


# --------------------------------------------------------------------------- stages


class Reducer(Protocol):
    def fit_transform(self, x: np.ndarray, knn: KnnGraph, seed: int) -> np.ndarray: ...


class Clusterer(Protocol):
    def fit_predict(self, y: np.ndarray) -> np.ndarray: ...


@dataclass
class KnnGraph:
    """Exact cosine k-nearest neighbours (self excluded), rows in canonical order."""

    indices: np.ndarray  # n × k int64
    distances: np.ndarray  # n × k float32, cosine distance

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def _topk(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and similarities of the k largest per row, sorted by (similarity desc, index asc)."""
    k = min(k, sims.shape[1])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.tile(
        np.arange(sims.shape[1]), (sims.shape[0], 1))
    vals = np.take_along_axis(sims, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, 1), np.take_along_axis(vals, order, 1)


def knn_search(queries: np.ndarray, base: np.ndarray, k: int, *, exclude_self: bool = False,
               block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k cosine neighbours of unit vectors, in blocks so memory stays bounded."""
    idx_out = np.empty((len(queries), k), dtype=np.int64)
    sim_out = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), block):
        sims = queries[start:start + block] @ base.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, start + rows] = -np.inf
        i, s = _topk(sims, k)
        idx_out[start:start + block], sim_out[start:start + block] = i, s
    return idx_out, sim_out


class ExactKnn:
    """Deterministic kNN graph stage (brute force is exact and fast enough for ≤ max_fit rows)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, x: np.ndarray) -> KnnGraph:
        idx, sims = knn_search(x, x, self.k, exclude_self=True)
        return KnnGraph(idx, np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32))


class UmapReducer:
    """Seeded UMAP that reuses the shared kNN graph and one shared spectral initialisation.

    Only the layout optimisation (negative sampling, edge order) depends on the seed: the fuzzy
    graph and its spectral embedding are functions of the kNN graph, so they are computed once
    per graph (with a fixed random state) and every seeded layout starts from them. Sharing the
    start removes one source of seed-to-seed variation (umap-learn otherwise redraws the spectral
    solver's start vector and noise per seed) and saves its cost in every layout.
    """

    def __init__(self, n_components: int = 5, min_dist: float = 0.0, n_epochs: int | None = 100,
                 shared_init: bool = True) -> None:
        self.n_components, self.min_dist, self.n_epochs = n_components, min_dist, n_epochs
        self.shared_init = shared_init
        self._init: tuple[int, np.ndarray | None] | None = None

    @staticmethod
    def _with_self(knn: KnnGraph) -> tuple[np.ndarray, np.ndarray]:
        """UMAP expects each row's own index first, at distance 0."""
        n = len(knn.indices)
        return (np.hstack([np.arange(n)[:, None], knn.indices]),
                np.hstack([np.zeros((n, 1), np.float32), knn.distances]))

    def initial_layout(self, x: np.ndarray, knn: KnnGraph, dim: int) -> np.ndarray | None:
        """Spectral layout of the fuzzy kNN graph (deterministic: fixed random state), cached per graph.

        None when the graph falls apart into several components (e.g. templated corpora without the
        near-duplicate collapse): umap-learn's multi-component spectral layout called this way
        took minutes there, so each seed then uses umap-learn's own spectral initialisation.
        """
        if self._init is not None and self._init[0] == id(knn) and (
                self._init[1] is None or self._init[1].shape[1] == dim):
            return self._init[1]
        from umap.spectral import spectral_layout
        from umap.umap_ import fuzzy_simplicial_set

        idx, dist = self._with_self(knn)
        rng = np.random.RandomState(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph, _, _ = fuzzy_simplicial_set(x, knn.k + 1, rng, "cosine", knn_indices=idx, knn_dists=dist)
            if connected_components(graph, directed=False)[0] > 1:
                self._init = (id(knn), None)
                return None
            layout = spectral_layout(x, graph, dim, rng, metric="cosine")
        span = np.abs(layout).max()
        layout = (10.0 * layout / (span if span > 0 else 1.0)).astype(np.float32)
        self._init = (id(knn), layout)
        return layout

    def fit_transform(self, x: np.ndarray, knn: KnnGraph, seed: int) -> np.ndarray:
        import umap

        n = len(x)
        dim = min(self.n_components, n - 2)
        idx, dist = self._with_self(knn)
        init = self.initial_layout(x, knn, dim) if self.shared_init else None
        if init is None:
            init = "spectral"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = umap.UMAP(n_neighbors=knn.k + 1, n_components=dim,
                              min_dist=self.min_dist, metric="cosine", random_state=seed,
                              n_epochs=self.n_epochs, precomputed_knn=(idx, dist, None), init=init)
            return model.fit_transform(x).astype(np.float32)


class HdbscanClusterer:
    """HDBSCAN on a low-dimensional layout; -1 marks outliers."""

    def __init__(self, min_cluster_size: int = 10, min_samples: int | None = 5) -> None:
        self.min_cluster_size, self.min_samples = min_cluster_size, min_samples

    def fit_predict(self, y: np.ndarray) -> np.ndarray:
        import hdbscan

        mcs = max(2, min(self.min_cluster_size, len(y)))
        ms = None if self.min_samples is None else max(1, min(self.min_samples, len(y) - 1))
        return hdbscan.HDBSCAN(min_cluster_size=mcs, min_samples=ms).fit_predict(y).astype(np.int64)


class AgglomerativeFallback:
    """Deterministic clustering for corpora too small for UMAP: average linkage on cosine distance."""

    def __init__(self, distance_threshold: float = 0.6, min_size: int = 2) -> None:
        self.distance_threshold, self.min_size = distance_threshold, min_size

    def fit_predict(self, x: np.ndarray) -> np.ndarray:
        if len(x) < 2:
            return np.full(len(x), OUTLIER, dtype=np.int64)
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                         distance_threshold=self.distance_threshold).fit_predict(x)
        sizes = np.bincount(labels)
        return np.where(sizes[labels] >= self.min_size, labels, OUTLIER).astype(np.int64)


@dataclass
class Consensus:
    """Majority-vote combination of several labelings over a shared kNN graph (see module docstring)."""

    threshold: float = 0.7
    min_cluster_size: int = 10
    neighbour_share: float = 0.3

    def combine(self, runs: np.ndarray, knn: KnnGraph) -> tuple[np.ndarray, np.ndarray]:
        """(labels, confidence) from `runs` (m × n labels, -1 = outlier)."""
        m, n = runs.shape
        rows = np.repeat(np.arange(n), knn.k)
        cols = knn.indices.ravel()
        co = ((runs[:, rows] == runs[:, cols]) & (runs[:, rows] != OUTLIER)).mean(0)
        keep = co > self.threshold if m > 1 else co > 0
        graph = sp.coo_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        sizes = np.bincount(comp)
        labels = np.where(sizes[comp] >= self.min_cluster_size, comp, OUTLIER).astype(np.int64)
        clustered_frac = (runs != OUTLIER).mean(0)
        weights = sp.csr_matrix((co, (rows, cols)), shape=(n, n))
        # Cores: rows clustered by a majority of runs whose majority edges reached a cluster.
        labels[clustered_frac <= 0.5] = OUTLIER
        labels = propagate(labels, knn, self.neighbour_share)
        confidence = _agreement(weights, labels, knn.k)
        return labels, confidence


def propagate(labels: np.ndarray, knn: KnnGraph, share: float, sweeps: int = 10) -> np.ndarray:
    """Give each unlabelled row the cluster holding more than `share` of its k nearest neighbours.

    The kNN graph is exact and the cores are stable, so this outlier decision does not depend
    on the seed: a row stays an outlier only when no cluster dominates its neighbourhood.
    """
    labels = labels.copy()
    need = int(np.floor(share * knn.k)) + 1
    for _ in range(sweeps):
        todo = np.flatnonzero(labels == OUTLIER)
        if not len(todo):
            break
        nb = labels[knn.indices[todo]]
        new, _ = _majority(nb, ignore_outliers=True)
        counts = (nb == new[:, None]).sum(1)
        ok = (new != OUTLIER) & (counts >= need)
        if not ok.any():
            break
        labels[todo[ok]] = new[ok]
    return labels


def _agreement(weights: sp.csr_matrix, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row: mean co-association with the neighbours that share its final label (0 for outliers)."""
    w = weights.tocoo()
    same = labels[w.row] == labels[w.col]
    conf = np.bincount(w.row[same], weights=w.data[same], minlength=len(labels)) / k
    conf[labels == OUTLIER] = 0.0
    return conf.astype(np.float32)


# --------------------------------------------------------------------------- keywords and examples


_STOP_EXTRA = ["ll", "ve", "don", "just", "like", "make", "want", "need"]


def ctfidf_keywords(texts: Sequence[str], labels: np.ndarray, n_keywords: int = 10) -> dict[int, list[str]]:
    """Class-based TF-IDF: each cluster is one document; weight = tf(term, class) · log(1 + A / f(term)).

    A is the mean number of words per class and f the term's count over all classes, so words
    frequent everywhere (e.g. "sorry" in a refusal corpus) score low and distinctive ones high.
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

    classes = sorted(set(labels.tolist()))
    docs = [" ".join(t for t, lab in zip(texts, labels, strict=True) if lab == c) for c in classes]
    try:
        vec = CountVectorizer(stop_words=sorted(ENGLISH_STOP_WORDS.union(_STOP_EXTRA)), ngram_range=(1, 2),
                              token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9'-]+\b", min_df=1)
        counts = vec.fit_transform(docs)
    except ValueError:  # empty vocabulary (texts are all stop words or symbols)
        return {c: [] for c in classes}
    counts = sp.csr_matrix(counts, dtype=np.float64)
    tf = sp.diags(1.0 / np.maximum(np.asarray(counts.sum(1)).ravel(), 1)) @ counts
    term_freq = np.asarray(counts.sum(0)).ravel()
    avg_words = counts.sum() / len(classes)
    idf = np.log1p(avg_words / np.maximum(term_freq, 1))
    scores = (tf @ sp.diags(idf)).toarray()
    vocab = vec.get_feature_names_out()
    out: dict[int, list[str]] = {}
    for row, c in enumerate(classes):
        order = np.lexsort((vocab, -scores[row]))
        out[c] = [str(vocab[j]) for j in order[:n_keywords] if scores[row, j] > 0]
    return out


def representatives(x: np.ndarray, labels: np.ndarray, texts: Sequence[str], k: int = 5) -> dict[int, list[int]]:
    """Per cluster, the row indices of up to k distinct texts closest (cosine) to the cluster centroid."""
    out: dict[int, list[int]] = {}
    for c in sorted(set(labels.tolist()) - {OUTLIER}):
        members = np.flatnonzero(labels == c)
        centroid = x[members].mean(0)
        centroid /= np.linalg.norm(centroid) or 1.0
        sims = x[members] @ centroid
        chosen: list[int] = []
        seen: set[str] = set()
        for j in members[np.lexsort((members, -sims))]:
            if texts[j] not in seen:
                seen.add(texts[j])
                chosen.append(int(j))
            if len(chosen) == k:
                break
        out[c] = chosen
    return out


def centroids(x: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Unit-norm mean embedding of each cluster (outliers excluded)."""
    out = {}
    for c in sorted(set(labels.tolist()) - {OUTLIER}):
        v = x[labels == c].mean(0)
        out[c] = v / (np.linalg.norm(v) or 1.0)
    return out


# --------------------------------------------------------------------------- the pipeline


@dataclass
class ClusterResult:
    """Labels per input row (input order) and everything needed to describe the clusters."""

    labels: np.ndarray
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

    @property
    def n_clusters(self) -> int:
        return len(set(self.labels.tolist()) - {OUTLIER})

    @property
    def outlier_fraction(self) -> float:
        return float((self.labels == OUTLIER).mean()) if len(self.labels) else 0.0

    def sizes(self) -> dict[int, int]:
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def canonical_order(texts: Sequence[str]) -> np.ndarray:
    """A permutation that sorts rows by (content hash, text, position): the same set in any order fits the same."""
    keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
    return np.asarray(sorted(range(len(texts)), key=lambda i: (keys[i], texts[i], i)), dtype=np.int64)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows as float32; input that already is (the embedder's output) is returned without a copy."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-4):
        return x
    return x / np.where(norms == 0, 1.0, norms)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Cluster ids by size (largest = 0), ties by first row in canonical order; -1 stays -1."""
    ids = [c for c in set(labels.tolist()) if c != OUTLIER]
    first = {c: int(np.flatnonzero(labels == c)[0]) for c in ids}
    size = {c: int((labels == c).sum()) for c in ids}
    order = sorted(ids, key=lambda c: (-size[c], first[c]))
    mapping = {c: i for i, c in enumerate(order)}
    return np.asarray([mapping.get(v, OUTLIER) for v in labels.tolist()], dtype=np.int64)


class ClusterPipeline:
    """kNN → UMAP × seeds → HDBSCAN → consensus (or the small-corpus fallback) → labels + descriptions."""

    def __init__(self, config: ClusterConfig | None = None, *, reducer: Reducer | None = None,
                 clusterer: Clusterer | None = None) -> None:
        self.config = config or ClusterConfig()
        c = self.config
        self.reducer = reducer or UmapReducer(c.n_components, c.min_dist, c.n_epochs)
        self._clusterer = clusterer

    def min_size(self, n_fit: int) -> int:
        """`min_cluster_size`, raised to `min_cluster_fraction` of the fitted rows when that is set.

        A fraction gives fewer, larger clusters on big corpora; templated corpora are handled by the
        near-duplicate collapse instead (a fraction left most of their rows outliers).
        """
        c = self.config
        return max(c.min_cluster_size, int(np.ceil(c.min_cluster_fraction * n_fit)))

    def fit_labels(self, x: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict]:
        """Labels and confidence for rows in *input order*; no keywords (used by stability checks)."""
        res = self._fit(x, texts, describe=False)
        return res.labels, res.confidence, res.timings

    def fit(self, x: np.ndarray, texts: Sequence[str]) -> ClusterResult:
        return self._fit(x, texts, describe=True)

    def _fit(self, x: np.ndarray, texts: Sequence[str], *, describe: bool) -> ClusterResult:
        c = self.config
        texts = list(texts)
        if len(texts) != len(x):
            raise ValueError(f"{len(texts)} texts but {len(x)} embeddings")
        if not texts:
            raise ValueError("nothing to cluster")
        timings: dict[str, float] = {}
        x = _normalise(x)
        order = canonical_order(texts)
        t = time.perf_counter()
        collapse = collapse_near_duplicates(x, c.dedup_threshold, c.max_fit, order=order)
        fit_pos = order[collapse.representatives]
        timings["dedup_s"] = time.perf_counter() - t
        xf = x[fit_pos]
        n_fit = len(fit_pos)
        seed_runs = None
        layout = None
        if n_fit < c.n_neighbors + 2:
            method = "agglomerative-fallback"
            t = time.perf_counter()
            labels_f = AgglomerativeFallback(c.fallback_distance, max(2, min(c.min_cluster_size, 2))
                                             ).fit_predict(xf)
            conf_f = (labels_f != OUTLIER).astype(np.float32)
            timings["cluster_s"] = time.perf_counter() - t
            knn = None
        else:
            method = "consensus-umap-hdbscan"
            t = time.perf_counter()
            knn = ExactKnn(c.n_neighbors).fit(xf)
            timings["knn_s"] = time.perf_counter() - t
            runs = []
            t = time.perf_counter()
            mcs = self.min_size(n_fit)
            clusterer = self._clusterer or HdbscanClusterer(mcs, c.min_samples)
            for seed in c.seeds:
                y = self.reducer.fit_transform(xf, knn, seed)
                runs.append(clusterer.fit_predict(y))
            timings["umap_hdbscan_s"] = time.perf_counter() - t
            t = time.perf_counter()
            seed_runs = np.asarray(runs)
            consensus = Consensus(c.consensus_threshold, mcs, c.neighbour_share)
            labels_f, conf_f = consensus.combine(seed_runs, knn)
            timings["consensus_s"] = time.perf_counter() - t
        labels_f = _renumber(labels_f)
        if describe and c.layout_2d and knn is not None:
            t = time.perf_counter()
            layout = UmapReducer(2, 0.1, c.n_epochs).fit_transform(xf, knn, c.seeds[0] if c.seeds else 0)
            timings["layout_2d_s"] = time.perf_counter() - t

        n = len(texts)
        labels = np.full(n, OUTLIER, dtype=np.int64)
        confidence = np.zeros(n, dtype=np.float32)
        fitted = np.zeros(n, dtype=bool)
        fitted[fit_pos] = True
        # Near-duplicates copy their representative's cluster (and map position).
        scanned = collapse.group >= 0
        copied, src = order[scanned], collapse.group[scanned]
        representative = np.full(n, -1, dtype=np.int64)
        representative[copied] = fit_pos[src]
        labels[copied], confidence[copied] = labels_f[src], conf_f[src]
        layout_all = None
        if layout is not None:
            layout_all = np.zeros((n, 2), dtype=np.float32)
            layout_all[copied] = layout[src]
        if (~scanned).any():
            t = time.perf_counter()
            rest = order[~scanned]
            k = min(c.n_neighbors, n_fit)
            idx, sims = knn_search(x[rest], xf, k)
            lab_nb = labels_f[idx]
            labels[rest], confidence[rest] = _majority(lab_nb)
            if layout_all is not None:
                w = np.maximum(sims, 1e-6)
                layout_all[rest] = (layout[idx] * w[..., None]).sum(1) / w.sum(1, keepdims=True)
            timings["assign_rest_s"] = time.perf_counter() - t

        reassigned = np.zeros(n, dtype=bool)
        if c.reassign_outliers:
            reassigned = reassign_outliers(x, labels, c.reassign_min_similarity)
        keywords: dict[int, list[str]] = {}
        reps: dict[int, list[int]] = {}
        if describe:
            t = time.perf_counter()
            keywords = ctfidf_keywords(texts, labels, c.n_keywords)
            reps = representatives(x, labels, texts, c.n_representatives)
            timings["describe_s"] = time.perf_counter() - t
        return ClusterResult(labels=labels, confidence=confidence, reassigned=reassigned, fitted=fitted,
                             keywords=keywords, representatives=reps, layout_2d=layout_all, method=method,
                             config=c, timings=timings, seed_runs=seed_runs, representative=representative)


def _majority(neighbour_labels: np.ndarray, ignore_outliers: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Most common label per row among its neighbours (nearest wins ties) and its share."""
    out = np.empty(len(neighbour_labels), dtype=np.int64)
    share = np.empty(len(neighbour_labels), dtype=np.float32)
    for i, row in enumerate(neighbour_labels):
        if ignore_outliers:
            kept = row[row != OUTLIER]
            row = kept if len(kept) else row
        values, first, counts = np.unique(row, return_index=True, return_counts=True)
        best = np.lexsort((first, -counts))[0]
        out[i], share[i] = values[best], counts[best] / len(row)
    share[out == OUTLIER] = 0.0
    return out, share


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
