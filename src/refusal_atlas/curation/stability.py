"""How much a clustering depends on arbitrary choices: seeds, the sample, `min_cluster_size`.

* Seeds: the pipeline is re-run with ≥ 5 disjoint seed blocks; pairwise ARI between the runs
  (outliers counted as one cluster, the strict convention BERTopic users report).
* Resamples: ≥ 5 random 80 % subsamples without replacement ("bootstrap" in the m-out-of-n
  sense; drawing with replacement would duplicate rows and fake dense neighbourhoods in the kNN
  graph). Each is compared with the reference run on the rows it contains.
* Per-cluster Jaccard stability: for each reference cluster, the mean over runs of its best
  Jaccard overlap with any cluster of that run (Hennig's cluster-wise stability); < 0.5 means the
  cluster is not reproducible, > 0.75 that it is.
* A sweep over `min_cluster_size` shows how the number of clusters and the outlier share move.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from sklearn.metrics import adjusted_rand_score

from refusal_atlas.curation.cluster import OUTLIER, ClusterConfig, ClusterPipeline


def spread(values: Sequence[float]) -> dict[str, float]:
    values = list(values)
    if not values:
        return {"mean": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def pairwise_ari(label_sets: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean / min / max ARI over all pairs of labelings of the same rows."""
    scores = [adjusted_rand_score(a, b) for a, b in itertools.combinations(label_sets, 2)]
    return {"pairs": len(scores), **spread(scores)}


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


Fit = Callable[[ClusterConfig, np.ndarray, list[str]], np.ndarray]


def _fit(config: ClusterConfig, x: np.ndarray, texts: list[str]) -> np.ndarray:
    return ClusterPipeline(replace(config, layout_2d=False)).fit_labels(x, texts)[0]


def seed_stability(config: ClusterConfig, x: np.ndarray, texts: Sequence[str], n_runs: int = 5,
                   reference: np.ndarray | None = None, fit: Fit = _fit) -> dict:
    """Re-run with `n_runs` disjoint seed blocks; pairwise ARI and per-cluster Jaccard vs `reference`."""
    texts = list(texts)
    runs = [fit(config.with_seed_base(b + 1), x, texts) for b in range(n_runs)]
    out: dict = {"runs": n_runs, "pairwise_ari": pairwise_ari(runs),
                 "n_clusters": spread([len(set(r.tolist()) - {OUTLIER}) for r in runs]),
                 "outlier_fraction": spread([float((r == OUTLIER).mean()) for r in runs])}
    if reference is not None:
        out["ari_vs_reference"] = spread([adjusted_rand_score(reference, r) for r in runs])
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
        runs.append((pos, fit(config, x[pos], [texts[i] for i in pos])))
    pair_scores = []
    for (pa, la), (pb, lb) in itertools.combinations(runs, 2):
        common, ia, ib = np.intersect1d(pa, pb, return_indices=True)
        if len(common) > 1:
            pair_scores.append(adjusted_rand_score(la[ia], lb[ib]))
    return {
        "resamples": n_resamples, "fraction": fraction,
        "ari_vs_reference": spread([adjusted_rand_score(reference[p], lab) for p, lab in runs]),
        "pairwise_ari": {"pairs": len(pair_scores), **spread(pair_scores)},
        "jaccard": jaccard_stability(reference, runs),
    }


def min_cluster_size_sweep(config: ClusterConfig, x: np.ndarray, texts: Sequence[str],
                           values: Sequence[int], reference: np.ndarray | None = None,
                           fit: Fit = _fit) -> list[dict]:
    """Number of clusters, outlier share and ARI vs the reference for each `min_cluster_size`."""
    out = []
    for v in values:
        labels = fit(replace(config, min_cluster_size=int(v)), x, list(texts))
        row = {"min_cluster_size": int(v), "n_clusters": len(set(labels.tolist()) - {OUTLIER}),
               "outlier_fraction": float((labels == OUTLIER).mean())}
        if reference is not None:
            row["ari_vs_reference"] = float(adjusted_rand_score(reference, labels))
        out.append(row)
    return out


def default_sweep(min_cluster_size: int) -> list[int]:
    """Half, the value itself, and double (at least 2), sorted and unique."""
    return sorted({max(2, min_cluster_size // 2), min_cluster_size, min_cluster_size * 2})


def stability_report(config: ClusterConfig, x: np.ndarray, texts: Sequence[str], reference: np.ndarray, *,
                     n_seed_runs: int = 5, n_resamples: int = 5, sweep: Sequence[int] | None = None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Everything above in one JSON-ready dict (written to stability.json)."""
    say = progress or (lambda _msg: None)
    say("stability: seed runs")
    seeds = seed_stability(config, x, texts, n_seed_runs, reference)
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
