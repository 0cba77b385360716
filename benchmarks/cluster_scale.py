#!/usr/bin/env python3
"""Clustering at scale: N templated prompts embedded (streamed, float16 on disk) and clustered, beside BERTopic.

The documents are the shared anchor's templated re-wordings (`../shared/benchmarks/cluster_peers.py`,
`synthesize`) of the pooled HarmBench + StrongREJECT + Do-Not-Answer prompts, labelled `source:category`.
Each step runs in its own process under `/usr/bin/time -v` (peak RSS of that step alone) and samples its
own RSS every second, so the embedding step shows whether its memory grows with the rows done:

1. `embed`: refusal-atlas' MiniLM embedder on a cold cache (its own folder in the workdir), writing into a
   float16 `.npy` memmap (`Embedder.encode(texts, out=...)`).
2. `ours`: `cluster_corpus` — the library call behind `curate cluster` — on a JSONL of the documents
   (`--text prompt`, defaults, no stability runs), reading the embeddings back from the warm cache;
   it fits at most `max_fit` representatives and assigns every other row by kNN.
3. `bertopic` at each `--peer-sizes` (the first rows of the same documents and embeddings, precomputed),
   BERTopic with its defaults and `random_state=0`, stopped after `--peer-timeout` seconds; larger sizes
   are skipped once one fails or times out.

Threads: OMP / MKL / numba / torch at 1 (`--threads`), all steps under the caller's `nice`.
Usage (repository root): nice -n 10 .venv/bin/python benchmarks/cluster_scale.py --n 200000
    --peer-sizes 20000 50000 200000 --workdir /tmp/scale [--out benchmarks/results/cluster_scale.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from results_io import write_results

ROOT = Path(__file__).resolve().parents[1]
# the shared anchor beside the repository (a worktree sits one folder deeper than the main checkout)
PEERS_PATH = next((p / "shared" / "benchmarks" / "cluster_peers.py" for p in ROOT.parents
                   if (p / "shared" / "benchmarks" / "cluster_peers.py").is_file()),
                  ROOT.parent / "shared" / "benchmarks" / "cluster_peers.py")


def peers():
    spec = importlib.util.spec_from_file_location("cluster_peers", PEERS_PATH)
    if spec is None or spec.loader is None or not PEERS_PATH.is_file():
        sys.exit(f"{PEERS_PATH}: peer benchmark not found (expected ../shared/benchmarks beside the repo)")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster_peers"] = module
    spec.loader.exec_module(module)
    return module


def rss_split() -> dict[str, float]:
    """RssAnon (the process' own heap) and RssFile (mapped files, e.g. a memmap's pages) in MiB, from /proc."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class RssTimeline:
    """This process' RSS every `interval` seconds: [(seconds since start, MiB, rows done)]."""

    def __init__(self, interval: float = 1.0) -> None:
        import psutil

        self._proc, self.interval = psutil.Process(), interval
        self.samples: list[tuple[float, float, int]] = []
        self.split: list[dict[str, float]] = []  # RssAnon / RssFile at each sample (Linux)
        self.done = 0
        self._stop = threading.Event()
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, self._proc.memory_info().rss / 2**20, self.done))
            self.split.append(rss_split())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssTimeline:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def read_docs(workdir: Path, n: int) -> list[dict]:
    with open(workdir / "docs.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh][:n]


def step_embed(workdir: Path, n: int) -> dict:
    import numpy as np

    from refusal_atlas.curation import embed as embed_mod
    from refusal_atlas.curation.embed import Embedder

    texts = [r["prompt"] for r in read_docs(workdir, n)]
    emb = Embedder(cache_root=workdir / "embeddings")  # where step 2 finds it (REFUSAL_ATLAS_CACHE)
    out = np.lib.format.open_memmap(workdir / "x.npy", mode="w+", dtype=np.float16, shape=(len(texts), 384))
    chunk = embed_mod.CHUNK
    with RssTimeline(5.0) as tl:
        t = time.perf_counter()
        # chunk by chunk through the public call, so the timeline can say how many rows were done
        for start in range(0, len(texts), chunk):
            emb.encode(texts[start:start + chunk], out=out[start:start + chunk])
            tl.done = min(len(texts), start + chunk)
        out.flush()
        seconds = time.perf_counter() - t
    return {"n": len(texts), "embed_s": seconds, "texts_per_s": len(texts) / seconds,
            "rss_timeline": tl.samples[::max(1, len(tl.samples) // 60)] + tl.samples[-1:],
            "rss_split_timeline": tl.split[::max(1, len(tl.split) // 60)] + tl.split[-1:]}


def step_ours(workdir: Path, n: int) -> dict:
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    from refusal_atlas.curation.cluster_run import cluster_corpus

    os.environ["REFUSAL_ATLAS_CACHE"] = str(workdir)  # embeddings/… is the warm cache of step 1
    with RssTimeline(1.0) as tl:
        t = time.perf_counter()
        run = cluster_corpus(workdir / "docs.jsonl", workdir / "ours", text_column="prompt", stability_runs=0)
        seconds = time.perf_counter() - t
    meta = run.meta if hasattr(run, "meta") else json.loads((workdir / "ours" / "clusters.json").read_text())
    table = pd.read_parquet(workdir / "ours" / "assignments.parquet")
    truth = table["source"].astype(str) + ":" + table["category"].astype(str)
    return {"n": len(table), "wall_s": seconds, "timings": meta["timings"], "n_clusters": meta["n_clusters"],
            "outlier_fraction": meta["outlier_fraction"], "n_fitted": int(table["fitted"].sum()),
            "ari": float(adjusted_rand_score(truth, table["cluster"])),
            "rss_peak_sampled_mib": max(s[1] for s in tl.samples)}


def step_bertopic(workdir: Path, n: int) -> dict:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    cp = peers()
    rows = read_docs(workdir, n)
    x = np.asarray(np.load(workdir / "x.npy", mmap_mode="r")[:n], dtype=np.float32)
    with RssTimeline(1.0) as tl:
        t = time.perf_counter()
        labels = cp.fit_once("bertopic", [r["prompt"] for r in rows], x, 0)
        seconds = time.perf_counter() - t
    truth = [f"{r['source']}:{r['category']}" for r in rows]
    return {"n": n, "fit_s": seconds, "n_clusters": len(set(labels.tolist()) - {-1}),
            "outlier_fraction": float((labels == -1).mean()), "ari": float(adjusted_rand_score(truth, labels)),
            "rss_peak_sampled_mib": max(s[1] for s in tl.samples)}


STEPS = {"embed": step_embed, "ours": step_ours, "bertopic": step_bertopic}


def run_step(args: argparse.Namespace, step: str, n: int, timeout: float | None) -> dict:
    """The step in a fresh process under /usr/bin/time -v; its JSON plus the peak RSS `time` saw."""
    result = args.workdir / f"{step}_{n}.json"
    result.unlink(missing_ok=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__), "--step", step, "--n", str(n),
           "--workdir", str(args.workdir)]
    print(f"[{time.strftime('%H:%M:%S')}] {step} n={n} ...", flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"n": n, "status": f"stopped after {timeout:.0f} s"}
    out = {"status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-400:]}",
           "process_wall_s": time.perf_counter() - t}
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if peak:
        out["max_rss_mib"] = int(peak.group(1)) / 1024
    if result.is_file():
        out.update(json.loads(result.read_text()))
    print(f"    {out['status']} in {out['process_wall_s']:.0f} s, max RSS {out.get('max_rss_mib', 0):.0f} MiB",
          flush=True)
    return out


def markdown(res: dict) -> str:
    e, o = res["embed"], res["ours"]
    lines = [f"# Clustering at scale ({res['machine']})", "",
             f"{res['n']} templated prompts (the shared anchor's re-wordings of the pooled HarmBench + StrongREJECT "
             f"+ Do-Not-Answer prompts, {res['n_unique']} distinct), labels `source:category`; threads "
             f"{res['threads']}, `nice -n 10`; load average before / after: {res['load_before']} / "
             f"{res['load_after']}.", "",
             "| step | rows | wall s | peak RSS MiB (/usr/bin/time) | clusters | outliers | ARI vs categories "
             "| notes |",
             "|---|---|---|---|---|---|---|---|"]
    tl = e.get("rss_timeline") or []
    started = [s for s in tl if s[2] > 0]
    flat = (f"RSS {started[0][1]:.0f} MiB after the first {started[0][2]} rows, {tl[-1][1]:.0f} MiB after "
            f"{tl[-1][2]}" if started else "")
    lines.append(f"| embed (cold cache, float16 memmap) | {e.get('n', '–')} | {e.get('embed_s', 0):.0f} | "
                 f"{e.get('max_rss_mib', 0):.0f} | – | – | – | {e.get('texts_per_s', 0):.0f} texts/s; {flat} |")
    if o.get("status") == "ok":
        t = o["timings"]
        lines.append(f"| ours: `cluster_corpus` (warm cache) | {o['n']} | {o['wall_s']:.0f} | {o['max_rss_mib']:.0f} | "
                     f"{o['n_clusters']} | {100 * o['outlier_fraction']:.1f} % | {o['ari']:.3f} | "
                     f"{o['n_fitted']} rows fitted; embed read {t.get('embed_s', 0):.0f} s, cluster "
                     f"{t.get('cluster_s', 0):.0f} s |")
    else:
        lines.append(f"| ours | {res['n']} | – | – | – | – | – | {o.get('status')} |")
    for p in res["bertopic"]:
        if p.get("status") == "ok":
            lines.append(f"| BERTopic (precomputed embeddings) | {p['n']} | {p['fit_s']:.0f} | "
                         f"{p['max_rss_mib']:.0f} | "
                         f"{p['n_clusters']} | {100 * p['outlier_fraction']:.1f} % | {p['ari']:.3f} | |")
        else:
            lines.append(f"| BERTopic | {p['n']} | – | – | – | – | – | {p.get('status')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--peer-sizes", type=int, nargs="*", default=[20_000, 50_000, 200_000])
    parser.add_argument("--peer-timeout", type=float, default=1800.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--step", choices=list(STEPS))
    parser.add_argument("--skip", nargs="*", default=[], choices=list(STEPS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster_scale.json")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.step:
        import warnings

        import torch

        warnings.filterwarnings("ignore")
        torch.set_num_threads(args.threads)
        res = STEPS[args.step](args.workdir, args.n)
        (args.workdir / f"{args.step}_{args.n}.json").write_text(json.dumps(res))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    cp = peers()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cluster_bench import load_records

    docs = cp.synthesize(load_records(cp), args.n, seed=0)
    with open(args.workdir / "docs.jsonl", "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"prompt": d["text"], "source": d["source"], "category": d["category"]}) + "\n")
    load_before = os.getloadavg()
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "n": args.n,
                 "n_unique": len({d["text"] for d in docs}), "threads": args.threads}
    res["embed"] = run_step(args, "embed", args.n, None) if "embed" not in args.skip else {}
    res["ours"] = run_step(args, "ours", args.n, None) if "ours" not in args.skip else {}
    res["bertopic"] = []
    for size in sorted(args.peer_sizes):
        if "bertopic" in args.skip:
            break
        row = run_step(args, "bertopic", min(size, args.n), args.peer_timeout)
        res["bertopic"].append(row)
        if row.get("status") != "ok":
            break
    write_results(res, args.out, markdown, load_before)


if __name__ == "__main__":
    main()
