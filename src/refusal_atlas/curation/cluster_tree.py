"""A cluster tree: the consensus leaf clusters merged upward by size-weighted Ward linkage, cut into levels.

Why a tree and why built this way (measurements in docs/decisions.md, "Clustering"):

* One flat density cut either collapses a corpus into a few giant clusters (HDBSCAN's
  excess-of-mass choice on 400 HarmBench prompts: 3) or scatters it (leaf choice: dozens).
  Both are true at their own resolution, so the pipeline keeps the fine clusters (leaves) and
  builds the coarser resolutions from them instead of choosing one.
* Merging leaves rather than re-clustering rows keeps every level nested in the next finer one,
  so a top cluster is exactly the union of its leaves and a taxonomy branch can be compared with
  a top cluster while its nodes are compared with leaves.
* Ward's criterion (the increase in within-cluster squared distance, `na·nb/(na+nb)·|ma − mb|²`)
  weighs cluster sizes, so a large leaf is not absorbed into a chain of small ones the way
  average or single linkage chains them; ties go to the lowest pair of ids, so the tree is a
  function of the leaves alone.
* Levels are cuts at every cluster count from 2 to 12, and above that at counts spaced by a factor
  1.2 (`ClusterConfig.level_ratio`) up to the number of leaves, so some level is always within a
  factor 1.1 of any count a user has in mind (the number of categories of a benchmark, of taxonomy
  branches, of a model's wordings).
* Outliers (-1) stay outliers at every level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OUTLIER = -1

__all__ = ["ClusterTree", "build_tree", "level_counts", "renumber"]


def renumber(labels: np.ndarray) -> np.ndarray:
    """Cluster ids by size (largest = 0), ties by first row; -1 stays -1."""
    labels = np.asarray(labels, dtype=np.int64)
    ids = [c for c in np.unique(labels).tolist() if c != OUTLIER]
    if not ids:
        return labels.copy()
    first = {c: int(np.flatnonzero(labels == c)[0]) for c in ids}
    size = {c: int((labels == c).sum()) for c in ids}
    order = sorted(ids, key=lambda c: (-size[c], first[c]))
    lut = {c: i for i, c in enumerate(order)}
    return np.asarray([lut.get(v, OUTLIER) for v in labels.tolist()], dtype=np.int64)


def level_counts(n_leaves: int, ratio: float = 1.2, smallest: int = 2, every_up_to: int = 12) -> list[int]:
    """Cluster counts of the levels, coarse to fine: every count from `smallest` to `every_up_to`, then
    n_leaves / ratio^i (rounded) above that, and n_leaves itself."""
    if n_leaves <= smallest:
        return [n_leaves] if n_leaves > 0 else [0]
    counts = set(range(smallest, min(n_leaves, every_up_to) + 1)) | {n_leaves}
    value = float(n_leaves)
    while value / ratio > every_up_to:
        value /= ratio
        counts.add(round(value))
    return sorted(counts)


@dataclass
class ClusterTree:
    """Leaf labels per row and the Ward merge order of the leaves (scipy-linkage style ids)."""

    leaves: np.ndarray  # per row: leaf id 0..F-1 (renumbered by size) or -1
    merges: np.ndarray  # (F-1) × 2 int64: ids merged at step i; leaves are 0..F-1, step i creates F+i
    heights: np.ndarray  # (F-1,) float64: Ward cost of each merge

    @property
    def n_leaves(self) -> int:
        return int(self.leaves.max()) + 1 if (self.leaves != OUTLIER).any() else 0

    def leaf_to_cluster(self, k: int) -> np.ndarray:
        """For each leaf, its cluster id when the tree is cut into `k` clusters (ids not yet renumbered)."""
        f = self.n_leaves
        k = max(1, min(int(k), f)) if f else 0
        parent = np.arange(2 * max(f, 1) - 1, dtype=np.int64)
        for step in range(f - k):
            a, b = self.merges[step]
            parent[a] = parent[b] = f + step
        out = np.empty(f, dtype=np.int64)
        for leaf in range(f):
            node = leaf
            while parent[node] != node:
                node = int(parent[node])
            out[leaf] = node
        return out

    def cut(self, k: int) -> np.ndarray:
        """Per-row labels with `k` clusters (clamped to [1, leaves]), renumbered by size; -1 stays -1."""
        if self.n_leaves == 0:
            return self.leaves.copy()
        lut = self.leaf_to_cluster(k)
        raw = np.where(self.leaves == OUTLIER, OUTLIER, lut[np.maximum(self.leaves, 0)])
        return renumber(raw)

    def levels(self, counts: list[int]) -> list[np.ndarray]:
        return [self.cut(k) for k in counts]


def build_tree(x: np.ndarray, leaves: np.ndarray) -> ClusterTree:
    """Ward-merge the leaf clusters of `leaves` (per row, -1 = outlier) using the rows' vectors `x`."""
    leaves = renumber(leaves)
    f = int(leaves.max()) + 1 if (leaves != OUTLIER).any() else 0
    if f <= 1:
        return ClusterTree(leaves, np.zeros((0, 2), dtype=np.int64), np.zeros(0))
    x64 = np.asarray(x, dtype=np.float64)
    size = np.bincount(leaves[leaves != OUTLIER], minlength=f).astype(np.float64)
    mean = np.zeros((f, x.shape[1]))
    np.add.at(mean, leaves[leaves != OUTLIER], x64[leaves != OUTLIER])
    mean /= size[:, None]
    ids = list(range(f))  # current id of each active slot
    active = np.ones(f, dtype=bool)
    sq = (mean ** 2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2.0 * mean @ mean.T
    np.maximum(dist, 0.0, out=dist)
    cost = size[:, None] * size[None, :] / (size[:, None] + size[None, :]) * dist
    cost[np.tril_indices(f)] = np.inf
    merges = np.zeros((f - 1, 2), dtype=np.int64)
    heights = np.zeros(f - 1)
    for step in range(f - 1):
        flat = int(np.argmin(cost))  # first minimum: the lowest (slot i, slot j) pair wins ties
        i, j = divmod(flat, f)
        merges[step] = sorted((ids[i], ids[j]))
        heights[step] = cost[i, j]
        # slot i becomes the merged cluster, slot j is retired
        total = size[i] + size[j]
        mean[i] = (size[i] * mean[i] + size[j] * mean[j]) / total
        size[i] = total
        active[j] = False
        ids[i] = f + step
        cost[j, :] = np.inf
        cost[:, j] = np.inf
        others = np.flatnonzero(active)
        others = others[others != i]
        if len(others):
            d = ((mean[others] - mean[i]) ** 2).sum(1)
            c = size[others] * size[i] / (size[others] + size[i]) * d
            lo, hi = np.minimum(others, i), np.maximum(others, i)
            cost[lo, hi] = c
    return ClusterTree(leaves, merges, heights)
