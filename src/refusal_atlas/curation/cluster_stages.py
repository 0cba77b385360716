"""The swappable stages of the clustering pipeline: configuration, kNN graph, UMAP, HDBSCAN, consensus.

Why the pipeline is built this way is in `refusal_atlas.curation.cluster`; this module holds
its parts, each a small object with a `fit` / `fit_predict`-style method.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

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
    selection: str = "eom"  # HDBSCAN's cluster choice per layout ("eom" or "leaf"); large clusters are split after
    # 32 layouts with supported edges: coarse tree levels agree from seed to seed on two sets of seed blocks
    # (docs/decisions.md, sessions 16-17)
    seeds: tuple[int, ...] = tuple(range(32))
    consensus_threshold: float = 0.7
    # a kept edge also needs this many common kept neighbours (at most min_cluster_size - 2, so a smallest
    # cluster still holds): one chain of edges no longer joins two cores in some seed blocks and not others
    consensus_support: int = 2
    neighbour_share: float = 0.3
    max_fit: int = 5000
    dedup_threshold: float = 0.85  # cosine at which rows collapse into one representative (>= 1: off)
    reassign_outliers: bool = False
    reassign_min_similarity: float = 0.5
    n_keywords: int = 10
    n_representatives: int = 5
    fallback_distance: float = 0.6
    layout_2d: bool = True
    distance_grid: float = 1.0 / 128  # kNN cosine distances rounded to this grid before UMAP (0: off)
    init_grid: float = 0.05  # the shared spectral start rounded to this grid (coordinates span ±10; 0: off)
    level_ratio: float = 1.2  # cluster counts of successive tree levels differ by this factor
    max_flat_share: float = 0.25  # a cluster holding more of the fitted rows is re-clustered on its own rows
    verbatim_min: int = 0  # a text repeated this often is a leaf of its own (0: min_cluster_size)
    split_depth: int = 2  # clusters above max_flat_share of the rows are re-clustered on their own, this deep

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

    def __init__(self, k: int, grid: float = 0.0) -> None:
        self.k, self.grid = k, grid

    def fit(self, x: np.ndarray) -> KnnGraph:
        """The graph; distances rounded to `grid` so that float noise below it cannot reach UMAP."""
        idx, sims = knn_search(x, x, self.k, exclude_self=True)
        dist = np.clip(1.0 - sims.astype(np.float64), 0.0, 2.0)
        if self.grid > 0:
            dist = np.round(dist / self.grid) * self.grid
            # neighbours at the same rounded distance in index order: near-ties cannot swap places
            order = np.lexsort((idx, dist), axis=1)
            idx, dist = np.take_along_axis(idx, order, 1), np.take_along_axis(dist, order, 1)
        return KnnGraph(idx, dist.astype(np.float32))


class UmapReducer:
    """Seeded UMAP that reuses the shared kNN graph and one shared spectral initialisation.

    Only the layout optimisation (negative sampling, edge order) depends on the seed: the fuzzy
    graph and its spectral embedding are functions of the kNN graph, so they are computed once
    per graph (with a fixed random state) and every seeded layout starts from them. Sharing the
    start removes one source of seed-to-seed variation (umap-learn otherwise redraws the spectral
    solver's start vector and noise per seed) and saves its cost in every layout.
    """

    def __init__(self, n_components: int = 5, min_dist: float = 0.0, n_epochs: int | None = 100,
                 shared_init: bool = True, init_grid: float = 0.0) -> None:
        self.n_components, self.min_dist, self.n_epochs = n_components, min_dist, n_epochs
        self.shared_init, self.init_grid = shared_init, init_grid
        self._init: tuple[KnnGraph, np.ndarray | None] | None = None  # the graph itself: ids get reused

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
        if self._init is not None and self._init[0] is knn and (
                self._init[1] is None or self._init[1].shape[1] == dim):
            return self._init[1]
        # heavy dependency (slow to import), loaded only when this runs
        from umap.spectral import spectral_layout

        # heavy dependency (slow to import), loaded only when this runs
        from umap.umap_ import fuzzy_simplicial_set

        idx, dist = self._with_self(knn)
        rng = np.random.RandomState(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph, _, _ = fuzzy_simplicial_set(x, knn.k + 1, rng, "cosine", knn_indices=idx, knn_dists=dist)
            if connected_components(graph, directed=False)[0] > 1:
                self._init = (knn, None)
                return None
            layout = spectral_layout(x, graph, dim, rng, metric="cosine")
        span = np.abs(layout).max()
        layout = 10.0 * layout / (span if span > 0 else 1.0)
        if self.init_grid > 0:
            # umap-learn seeds each point's negative sampling from the bits of its start coordinate, so
            # noise in the last bits would act like a new seed; on a grid the bits are those of the grid
            layout = np.round(layout / self.init_grid) * self.init_grid
        layout = layout.astype(np.float32)
        self._init = (knn, layout)
        return layout

    def fit_transform(self, x: np.ndarray, knn: KnnGraph, seed: int) -> np.ndarray:
        # heavy dependency (slow to import), loaded only when this runs
        import umap

        n = len(x)
        dim = min(self.n_components, n - 2)
        idx, dist = self._with_self(knn)
        layout = self.initial_layout(x, knn, dim) if self.shared_init else None
        init: np.ndarray | str = "spectral" if layout is None else layout
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = umap.UMAP(n_neighbors=knn.k + 1, n_components=dim,
                              min_dist=self.min_dist, metric="cosine", random_state=seed,
                              n_epochs=self.n_epochs, precomputed_knn=(idx, dist, None), init=init)
            return model.fit_transform(x).astype(np.float32)


class HdbscanClusterer:
    """HDBSCAN on a low-dimensional layout; -1 marks outliers."""

    def __init__(self, min_cluster_size: int = 10, min_samples: int | None = 5, selection: str = "eom") -> None:
        self.min_cluster_size, self.min_samples, self.selection = min_cluster_size, min_samples, selection

    def fit_predict(self, y: np.ndarray) -> np.ndarray:
        # heavy dependency (slow to import), loaded only when this runs
        import hdbscan

        mcs = max(2, min(self.min_cluster_size, len(y)))
        ms = None if self.min_samples is None else max(1, min(self.min_samples, len(y) - 1))
        return hdbscan.HDBSCAN(min_cluster_size=mcs, min_samples=ms,
                               cluster_selection_method=self.selection).fit_predict(y).astype(np.int64)


class AgglomerativeFallback:
    """Deterministic clustering for corpora too small for UMAP: average linkage on cosine distance."""

    def __init__(self, distance_threshold: float = 0.6, min_size: int = 2) -> None:
        self.distance_threshold, self.min_size = distance_threshold, min_size

    def fit_predict(self, x: np.ndarray, weights: np.ndarray | None = None, min_rows: float | None = None
                    ) -> np.ndarray:
        """Labels of the rows of `x`: a group is kept with `min_size` rows of `x`, or — `weights` being the rows
        each stands for (its near-duplicates) — with `min_rows` rows behind it, so twenty paraphrases of one
        request collapsed to one row are still a group while three copies are not (at `min_rows` 10)."""
        if len(x) == 0:
            return np.zeros(0, dtype=np.int64)
        if len(x) < 2:
            labels = np.zeros(len(x), dtype=np.int64)
        else:
            # heavy dependency (slow to import), loaded only when this runs
            from sklearn.cluster import AgglomerativeClustering

            labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                             distance_threshold=self.distance_threshold).fit_predict(x)
        keep = np.bincount(labels) >= self.min_size
        if weights is not None and min_rows is not None:
            keep |= np.bincount(labels, weights=np.asarray(weights, dtype=np.float64)) >= min_rows
        return np.where(keep[labels], labels, OUTLIER).astype(np.int64)


@dataclass
class Consensus:
    """Majority-vote combination of several labelings over a shared kNN graph (see module docstring)."""

    threshold: float = 0.7
    min_cluster_size: int = 10
    neighbour_share: float = 0.3
    support: int = 0  # common kept neighbours an edge needs (see `supported_edges`)

    def combine(self, runs: np.ndarray, knn: KnnGraph) -> tuple[np.ndarray, np.ndarray]:
        """(labels, confidence) from `runs` (m × n labels, -1 = outlier)."""
        m, n = runs.shape
        rows = np.repeat(np.arange(n), knn.k)
        cols = knn.indices.ravel()
        co = ((runs[:, rows] == runs[:, cols]) & (runs[:, rows] != OUTLIER)).mean(0)
        keep = co > self.threshold if m > 1 else co > 0
        graph = sp.coo_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(n, n))
        graph = supported_edges(graph, min(self.support, self.min_cluster_size - 2))
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


def supported_edges(graph: sp.coo_matrix, support: int) -> sp.coo_matrix:
    """The (symmetrised) edges of `graph` whose two ends share at least `support` other neighbours in it.

    Connected components join two cores through a single chain of kept edges; whether that chain
    exists flips from one block of layouts to the next, so the same region was one cluster or two.
    An edge inside a group has many common neighbours, a bridge few. `support` ≤ 0: the graph as it is.
    """
    if support <= 0:
        return graph
    n = graph.shape[0]
    a = graph.tocsr()
    a = ((a + a.T) > 0).astype(np.float64)
    common = (a @ a).multiply(a).tocoo()
    ok = common.data >= support
    return sp.coo_matrix((np.ones(int(ok.sum())), (common.row[ok], common.col[ok])), shape=(n, n))


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
        new, _ = neighbour_majority(nb, ignore_outliers=True)
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


def neighbour_majority(neighbour_labels: np.ndarray, ignore_outliers: bool = False) -> tuple[np.ndarray, np.ndarray]:
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
