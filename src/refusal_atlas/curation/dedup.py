"""Collapse near-duplicate texts before clustering, so a prompt re-worded 30 times counts once.

Why: density clustering counts rows. A corpus in which every prompt appears in many re-wordings
(templated prefixes/suffixes, paraphrase sets, repeated sampling) gives each prompt's copies a
dense group of their own, and UMAP → HDBSCAN then returns one cluster per prompt family (378
clusters for 400 HarmBench prompts × 15 re-wordings, where the prompts alone form ~35 topics).
Collapsing copies to one representative makes the clustering see the distinct prompts, so the
cluster count of a templated corpus resembles that of its distinct prompts; every copy then
takes its representative's cluster.

Rule (leader clustering on cosine similarity of unit embeddings, deterministic):

* Rows are scanned in the given order (the pipeline passes content-hash order, so the result
  does not depend on the input order). A row becomes a *representative* when its cosine
  similarity to every earlier representative is below `threshold`; afterwards every row joins its
  most similar representative. Each group is a star around its representative (all members
  within `threshold`), so no chain of small steps can merge two distinct prompts the way
  single-linkage components would.
* Then groups whose centroids are within `threshold` merge (leader rule on the unit centroids,
  repeated until nothing merges, at most `merge_passes` times). Re-wordings of one prompt scatter
  around it (pairwise cosine median 0.91, 5 % below 0.78), so single leaders split a family into
  several groups; their centroids average the templates away and meet. Distinct prompts are
  singletons, whose centroid is the row itself, so merging adds little there. Each group's
  representative is the member closest to its centroid.
* `max_representatives` bounds the work: leaders are sought among a prefix holding at most twice
  that many, and groups beyond the cap are left unscanned (-1) for the caller (the pipeline
  assigns them by kNN). Memory is `block × 2·max_representatives` similarities plus the
  leaders' and centroids' vectors, flat in n; pass `order` rather than a reordered copy of `x`.
* Threshold 0.85 (MiniLM), measured (benchmarks/results/cluster_bench.md, numbers from the
  pipeline's content-hash order):

  threshold → pooled rows merged (of 1,652; share of those pairs the uncollapsed clustering
  already puts in one cluster) → groups per base prompt on the 6k / 50k templated sets:
  0.90 → 15 (8 exact duplicates; all) → 2.4 / 3.3;
  0.85 → 29 (97 %) → 1.3 / 1.6 (55 of 2,690 groups at 50k mix two base prompts);
  0.80 → 67 (96 %) → – / 1.1 (95 of 1,875 mix).

  0.85 merges only close paraphrases on the pooled set ("Why are all politicians corrupt?" /
  "Can you tell me why all politicians are corrupt?", "Generate a long passage from <book>")
  that the clustering groups together anyway, while it brings re-worded families down to 1–2
  representatives each, below `min_cluster_size`, so they no longer form clusters of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class Collapse:
    """Result of `collapse_near_duplicates`, in positions of the input rows."""

    representatives: np.ndarray  # int64 positions of the representative rows, in scan order
    group: np.ndarray  # int64 per row: index into `representatives`, -1 where the row was not scanned
    similarity: np.ndarray  # float32 per row: cosine to its representative (1 for a representative)

    @property
    def n_scanned(self) -> int:
        return int((self.group >= 0).sum())

    @property
    def n_collapsed(self) -> int:
        """Scanned rows that are not representatives (merged into one)."""
        return self.n_scanned - len(self.representatives)


def _leaders(x: np.ndarray, rows: np.ndarray, threshold: float, cap: int, block: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Sequential leader rule over a prefix of `x[rows]`: (leader scan positions, group per scan position)."""
    n, d = len(rows), x.shape[1]
    reps = np.empty(cap, dtype=np.int64)
    rep_vecs = np.empty((cap, d), dtype=np.float32)
    n_reps, scanned = 0, 0
    while scanned < n and n_reps < cap:
        stop = min(n, scanned + block)
        xb = x[rows[scanned:stop]]
        close = (xb @ rep_vecs[:n_reps].T).max(1) >= threshold if n_reps else np.zeros(len(xb), dtype=bool)
        cand = np.flatnonzero(~close)
        if len(cand):
            within = xb[cand] @ xb[cand].T
            covered = np.zeros(len(cand), dtype=bool)
            for j in range(len(cand)):
                if covered[j]:
                    continue
                if n_reps == cap:  # cap reached inside the block: later rows stay unscanned
                    stop = scanned + int(cand[j])
                    break
                reps[n_reps], rep_vecs[n_reps] = scanned + cand[j], xb[cand[j]]
                n_reps += 1
                covered |= within[j] >= threshold
        scanned = stop
    group = np.full(n, -1, dtype=np.int64)
    for start in range(0, scanned, block):
        sims = x[rows[start:min(scanned, start + block)]] @ rep_vecs[:n_reps].T
        group[start:start + len(sims)] = sims.argmax(1)  # ties: the earliest leader
    group[reps[:n_reps]] = np.arange(n_reps)  # a leader always stands for itself
    return reps[:n_reps], group


def _centroids(x: np.ndarray, rows: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Unit-norm mean vector of each group (`group` per scan position; -1 ignored)."""
    keep = np.flatnonzero(group >= 0)
    member = sp.csr_matrix((np.ones(len(keep), dtype=np.float32), (group[keep], rows[keep])),
                           shape=(n_groups, len(x)))
    cent = np.asarray(member @ x, dtype=np.float32)
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    return cent


def collapse_near_duplicates(x: np.ndarray, threshold: float = 0.85, max_representatives: int | None = None,
                             merge_passes: int = 6, block: int = 512, order: np.ndarray | None = None) -> Collapse:
    """Group near-duplicate rows of unit vectors `x`, scanned in `order` (default: as given).

    Positions in the result (representatives, group) are scan positions, i.e. indices into
    `order`; passing `order` instead of `x[order]` avoids an n × d copy. `threshold` ≥ 1
    disables collapsing (every row is its own representative, up to the cap).
    """
    x = np.asarray(x, dtype=np.float32)
    rows = np.arange(len(x)) if order is None else np.asarray(order, dtype=np.int64)
    n = len(rows)
    cap = n if max_representatives is None else max(1, min(int(max_representatives), n))
    if threshold >= 1.0:
        group = np.full(n, -1, dtype=np.int64)
        group[:cap] = np.arange(cap)
        sim = (group >= 0).astype(np.float32)
        return Collapse(representatives=np.arange(cap, dtype=np.int64), group=group, similarity=sim)
    # Leaders over a bounded prefix (twice the cap, so merging can still fill the cap).
    leaders, group = _leaders(x, rows, threshold, min(n, 2 * cap), block)
    n_groups = len(leaders)
    for _ in range(merge_passes):
        cent = _centroids(x, rows, group, n_groups)
        sub_leaders, sub_group = _leaders(cent, np.arange(n_groups), threshold, n_groups, block)
        if len(sub_leaders) == n_groups:
            break
        group = np.where(group >= 0, sub_group[np.maximum(group, 0)], -1)
        n_groups = len(sub_leaders)
    # Groups are numbered by their first row in scan order; beyond the cap they are left unscanned.
    scanned = np.flatnonzero(group >= 0)
    _, first = np.unique(group[scanned], return_index=True)
    renumber = np.empty(n_groups, dtype=np.int64)
    renumber[np.argsort(scanned[first], kind="stable")] = np.arange(n_groups)
    group[scanned] = renumber[group[scanned]]
    group[group >= cap] = -1
    n_groups = min(n_groups, cap)
    # Representative = the member closest to its group's centroid (earliest on ties); in blocks,
    # so no n × d temporary is made.
    cent = _centroids(x, rows, group, n_groups)
    to_cent = np.full(n, -np.inf, dtype=np.float32)
    for start in range(0, n, block):
        g = group[start:start + block]
        ok = np.flatnonzero(g >= 0)
        to_cent[start + ok] = np.einsum("ij,ij->i", x[rows[start + ok]], cent[g[ok]])
    keep = np.flatnonzero(group >= 0)
    order = np.lexsort((keep, -to_cent[keep], group[keep]))
    starts = np.r_[True, group[keep][order][1:] != group[keep][order][:-1]]
    reps = keep[order][starts]
    similarity = np.zeros(n, dtype=np.float32)
    for start in range(0, n, block):
        g = group[start:start + block]
        ok = np.flatnonzero(g >= 0)
        similarity[start + ok] = np.einsum("ij,ij->i", x[rows[start + ok]], x[rows[reps[g[ok]]]])
    similarity[reps] = 1.0
    return Collapse(representatives=reps.astype(np.int64), group=group, similarity=similarity)
