"""How much a clustering depends on arbitrary choices: seeds, the sample, `min_cluster_size`.

* Seeds: the pipeline is re-run with ≥ 5 disjoint seed blocks; pairwise ARI between the runs
  (outliers counted as one cluster, the strict convention BERTopic users report).
* Resamples: ≥ 5 random 80 % subsamples without replacement ("bootstrap" in the m-out-of-n
  sense; drawing with replacement would duplicate rows and fake dense neighbourhoods in the kNN
  graph). Each is compared with the reference run on the rows it contains.
* Per-cluster Jaccard stability: for each reference cluster, the mean over runs of its best
  Jaccard overlap with any cluster of that run (Hennig's cluster-wise stability); < 0.5 means the
  cluster is not reproducible, > 0.75 that it is.
* A sweep over `min_cluster_size` shows how the number of clusters and the outlier share move;
  `suggest_min_cluster_size` reads it when a run clusters nothing or leaves most rows outliers.
* Every level of the cluster tree gets its own seed ARI: each seed run's tree is cut at the
  reference level's cluster count, so levels are compared at equal resolution.
* When nothing is clustered there is nothing to be stable: ARI is then reported as None, never
  as the 1.0 that identical all-outlier labelings would score. With one cluster the ARI says only
  whether the runs agree on which rows are outliers, and `ari_phrase` says so wherever it is shown.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from sklearn.metrics import adjusted_rand_score

from refusal_atlas.curation.cluster import OUTLIER, ClusterConfig, ClusterPipeline, ClusterResult


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean / min / max; None for each when there are no values (JSON has no NaN)."""
    values = list(values)
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def nothing_clustered(label_sets: Sequence[np.ndarray]) -> bool:
    return all(not (np.asarray(lab) != OUTLIER).any() for lab in label_sets)


def pairwise_ari(label_sets: Sequence[np.ndarray]) -> dict[str, float | None]:
    """Mean / min / max ARI over all pairs of labelings of the same rows (None when no labeling has a cluster)."""
    if nothing_clustered(label_sets):
        return {"pairs": 0, "mean": None, "min": None, "max": None}
    scores = [adjusted_rand_score(a, b) for a, b in itertools.combinations(label_sets, 2)]
    return {"pairs": len(scores), **spread(scores)}


def ari_phrase(name: str, ari: dict | None, n_clusters: int) -> str:
    """`name` and its mean ARI as a reader should see it: "–" when there is none, and with one cluster
    what the figure then measures (the cluster/outlier split, not a partition into clusters)."""
    mean = (ari or {}).get("mean")
    if mean is None:
        return f"{name} – (nothing clustered to compare)"
    if n_clusters < 2:
        return f"{name} {mean:.3f} (one cluster: it measures only which rows are outliers)"
    return f"{name} {mean:.3f}"


def best_match_jaccard(reference: np.ndarray, other: np.ndarray) -> dict[int, float]:
    """For each reference cluster (not -1): the largest Jaccard index with any cluster of `other`."""
    out: dict[int, float] = {}
    other_sets = {c: set(np.flatnonzero(other == c).tolist()) for c in set(other.tolist()) - {OUTLIER}}
    for c in sorted(set(reference.tolist()) - {OUTLIER}):
        ref = set(np.flatnonzero(reference == c).tolist())
        best = 0.0
        for members in other_sets.values():
            inter = len(ref & members)
            if inter:
                best = max(best, inter / len(ref | members))
        out[c] = best
    return out


def jaccard_stability(reference: np.ndarray, runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[int, float]:
    """Mean best-match Jaccard per reference cluster over `runs` = [(row positions, labels)]."""
    acc: dict[int, list[float]] = {c: [] for c in sorted(set(reference.tolist()) - {OUTLIER})}
    for positions, labels in runs:
        for c, j in best_match_jaccard(reference[positions], labels).items():
            acc[c].append(j)
    return {c: float(np.mean(v)) if v else 0.0 for c, v in acc.items()}


Fit = Callable[[ClusterConfig, np.ndarray, list[str]], ClusterResult]


def _fit(config: ClusterConfig, x: np.ndarray, texts: list[str]) -> ClusterResult:
    return ClusterPipeline(replace(config, layout_2d=False)).fit_tree(x, texts)


def _n_clusters(labels: np.ndarray) -> int:
    return len(set(labels.tolist()) - {OUTLIER})


def seed_stability(config: ClusterConfig, x: np.ndarray, texts: Sequence[str], n_runs: int = 5,
                   reference: np.ndarray | None = None, fit: Fit = _fit,
                   level_counts: Sequence[int] = ()) -> dict:
    """Re-run with `n_runs` disjoint seed blocks; pairwise ARI and per-cluster Jaccard vs `reference`.

    Runs are compared at the reference's flat cluster count (each run's tree cut there), and at
    each of `level_counts` for the per-level figures.
    """
    texts = list(texts)
    results = [fit(config.with_seed_base(b + 1), x, texts) for b in range(n_runs)]
    k = _n_clusters(reference) if reference is not None else None
    runs = [r.cut(k) if k else r.labels for r in results]
    out: dict = {"runs": n_runs, "pairwise_ari": pairwise_ari(runs),
                 "n_clusters": spread([_n_clusters(r) for r in runs]),
                 "outlier_fraction": spread([float((r == OUTLIER).mean()) for r in runs]),
                 "levels": [{"n_clusters": int(c), "pairwise_ari": pairwise_ari([r.cut(c) for r in results])}
                            for c in level_counts]}
    if reference is not None:
        out["ari_vs_reference"] = (spread([adjusted_rand_score(reference, r) for r in runs])
                                   if not nothing_clustered([reference, *runs]) else spread([]))
        all_rows = np.arange(len(texts))
        out["jaccard"] = jaccard_stability(reference, [(all_rows, r) for r in runs])
    return out


def resample_stability(config: ClusterConfig, x: np.ndarray, texts: Sequence[str], reference: np.ndarray,
                       n_resamples: int = 5, fraction: float = 0.8, seed: int = 0, fit: Fit = _fit) -> dict:
    """Cluster `n_resamples` random subsamples; ARI vs the reference on shared rows, Jaccard per cluster."""
    texts = list(texts)
    rng = np.random.default_rng(seed)
    n = len(texts)
    size = max(2, round(fraction * n))
    runs: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(n_resamples):
        pos = np.sort(rng.choice(n, size=size, replace=False))
        res = fit(config, x[pos], [texts[i] for i in pos])
        runs.append((pos, res.cut(_n_clusters(reference)) if _n_clusters(reference) else res.labels))
    pair_scores = []
    for (pa, la), (pb, lb) in itertools.combinations(runs, 2):
        common, ia, ib = np.intersect1d(pa, pb, return_indices=True)
        if len(common) > 1:
            pair_scores.append(adjusted_rand_score(la[ia], lb[ib]))
    empty = nothing_clustered([reference, *(lab for _, lab in runs)])
    return {
        "resamples": n_resamples, "fraction": fraction,
        "ari_vs_reference": spread([] if empty else [adjusted_rand_score(reference[p], lab) for p, lab in runs]),
        "pairwise_ari": {"pairs": len(pair_scores), **spread([] if empty else pair_scores)},
        "jaccard": jaccard_stability(reference, runs),
    }


def min_cluster_size_sweep(config: ClusterConfig, x: np.ndarray, texts: Sequence[str],
                           values: Sequence[int], reference: np.ndarray | None = None,
                           fit: Fit = _fit) -> list[dict]:
    """Number of clusters (flat, leaves), outlier share and ARI vs the reference for each `min_cluster_size`."""
    out = []
    for v in values:
        res = fit(replace(config, min_cluster_size=int(v)), x, list(texts))
        labels = res.labels
        row = {"min_cluster_size": int(v), "n_clusters": _n_clusters(labels),
               "n_leaves": res.tree.n_leaves if res.tree is not None else _n_clusters(labels),
               "outlier_fraction": float((labels == OUTLIER).mean())}
        if reference is not None:
            row["ari_vs_reference"] = float(adjusted_rand_score(reference, labels))
        out.append(row)
    return out


def default_sweep(min_cluster_size: int) -> list[int]:
    """Half, the value itself, and double (at least 2), sorted and unique."""
    return sorted({max(2, min_cluster_size // 2), min_cluster_size, min_cluster_size * 2})


def rescue_sweep(min_cluster_size: int) -> list[int]:
    """Smaller values to try when a run clustered nothing or left most rows outliers."""
    return sorted({v for v in (2, 3, 5, min_cluster_size // 2, min_cluster_size) if 2 <= v <= min_cluster_size})


def suggest_min_cluster_size(sweep_rows: Sequence[dict], max_outliers: float = 0.5) -> dict | None:
    """The largest swept value that gives a cluster and at most `max_outliers` outliers; else the fewest outliers.

    None when no swept value gives any cluster.
    """
    usable = [r for r in sweep_rows if r["n_clusters"] >= 1]
    if not usable:
        return None
    good = [r for r in usable if r["outlier_fraction"] <= max_outliers]
    if good:
        return max(good, key=lambda r: r["min_cluster_size"])
    return min(usable, key=lambda r: (r["outlier_fraction"], -r["min_cluster_size"]))


def stability_report(config: ClusterConfig, x: np.ndarray, texts: Sequence[str], reference: np.ndarray, *,
                     n_seed_runs: int = 5, n_resamples: int = 5, sweep: Sequence[int] | None = None,
                     progress: Callable[[str], None] | None = None, level_counts: Sequence[int] = ()) -> dict:
    """Everything above in one JSON-ready dict (written to stability.json)."""
    say = progress or (lambda _msg: None)
    say("stability: seed runs")
    seeds = seed_stability(config, x, texts, n_seed_runs, reference, level_counts=level_counts)
    say("stability: resamples")
    resamples = resample_stability(config, x, texts, reference, n_resamples)
    say("stability: min_cluster_size sweep")
    sweep_rows = min_cluster_size_sweep(config, x, texts, sweep or default_sweep(config.min_cluster_size),
                                        reference)
    clusters = sorted(set(reference.tolist()) - {OUTLIER})
    per_cluster = {str(c): {"seed_jaccard": seeds["jaccard"].get(c, 0.0),
                            "resample_jaccard": resamples["jaccard"].get(c, 0.0)} for c in clusters}
    seeds = {k: v for k, v in seeds.items() if k != "jaccard"}
    resamples = {k: v for k, v in resamples.items() if k != "jaccard"}
    return {"seeds": seeds, "resamples": resamples, "min_cluster_size_sweep": sweep_rows,
            "per_cluster": per_cluster}
