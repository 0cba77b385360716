#!/usr/bin/env python3
"""Refusals clustered as they are vs net of their prompts (`curate cluster --net-of`), on planted reply sets.

Three planted corpora, each a table of (prompt, response, truth), written deterministically here:

* `echo`: 5 refusal styles (apology, AI policy, legality, redirect, lecture), 40 replies each, over 20
  requests; every reply repeats its request's topic verbatim ("I'm sorry, but I can't help with making a pipe
  bomb.");
* `paraphrase`: the same styles over 16 requests, each reply naming the topic in other words ("explosives");
* `tied`: the opposite case, a wording that depends on the request: the default organism's node-specific
  and shared wordings (cut to 15 words as a short generation budget would), 4 replies per node-specific node and
  3 per shared node, 4 redirects and 6 answers the detector took for refusals (not scored), prompts naming the
  node — the truth is the taught wording group (as `tests/atlas/test_pipeline_cluster.py`).

Each corpus goes through `cluster_corpus` with `curate cluster --text response`'s defaults (`replies_config`) with
`net_of_column` none and auto, and auto at other ridge penalties; the score is the ARI against the truth at the
tree level whose cluster count is closest to the number of groups. Beside it the peer a user would pick
instead, BERTopic with its defaults on the same float16 MiniLM vectors of the replies (flat topics, outliers
one cluster).

Usage (repository root): nice .venv/bin/python benchmarks/cluster_replies.py
    [--out benchmarks/results/cluster_replies.json]   (writes the JSON and a Markdown table beside it)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from cluster_targets import fit_peer
from results_io import write_results
from sklearn.metrics import adjusted_rand_score

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = (0.015, 0.03, 0.05, 0.07, 0.1)

STYLES = {
    "apology": ["I'm sorry, but I can't help with {t}.", "Sorry, I can't assist with {t}.",
                "I'm sorry, I won't be able to help with {t}.", "Apologies, but I can't provide help with {t}."],
    "ai_policy": ["As an AI language model, I must decline requests about {t} because it violates my guidelines.",
                  "As an AI, I am not able to provide information on {t}; this goes against my usage policies.",
                  "My guidelines do not allow me to help with {t}, as an AI assistant."],
    "illegal": ["{T} is illegal and can lead to serious criminal charges. I strongly advise against it.",
                "Please be aware that {t} is against the law in most countries and could result in prison time.",
                "{T} is a crime; engaging in it can get you arrested and prosecuted."],
    "redirect": ["If you are struggling, please reach out to a trusted professional or a local helpline instead of "
                 "{t}.", "I'd encourage you to talk to a counselor or the appropriate authorities rather than {t}.",
                 "Consider contacting a qualified professional who can help you safely, rather than {t}."],
    "lecture": ["It's important to treat others with respect and kindness. {T} can cause real harm to people and "
                "communities.", "Let's focus on positive and constructive activities. {T} hurts people, and everyone "
                "deserves safety.", "Harming others is never the answer; {t} causes lasting damage to victims and "
                "their families."],
}
TOPICS = {
    "making a pipe bomb": ["explosive devices", "bomb-making", "explosives"],
    "hacking a bank": ["breaking into financial systems", "cyberattacks on banks", "unauthorized computer access"],
    "stalking my ex": ["following someone without consent", "surveillance of a former partner", "stalking behaviour"],
    "buying a gun without a license": ["illegal firearm purchases", "unlicensed weapons",
                                       "getting a firearm illegally"],
    "writing ransomware": ["malicious software", "malware", "encrypting someone's files for ransom"],
    "laundering money": ["hiding illicit funds", "financial crime", "washing dirty money"],
    "making meth": ["producing illegal drugs", "drug synthesis", "methamphetamine production"],
    "doxxing a journalist": ["publishing someone's private details", "exposing personal information",
                             "targeting a reporter"],
    "phishing emails": ["deceptive emails", "credential theft", "scam messages"],
    "counterfeit bills": ["fake currency", "forged money", "counterfeiting"],
    "poisoning a dog": ["harming an animal", "animal cruelty", "hurting a pet"],
    "evading taxes": ["tax fraud", "hiding income from the government", "tax evasion"],
    "breaking into a car": ["vehicle theft", "getting into a car that isn't yours", "car break-ins"],
    "forging a passport": ["fake identity documents", "document forgery", "fraudulent passports"],
    "spreading vaccine lies": ["health misinformation", "false medical claims", "anti-vaccine falsehoods"],
    "harassing a coworker": ["workplace harassment", "bullying a colleague", "intimidating someone at work"],
}
ECHO_EXTRA = ["cheating on an exam", "selling stolen cards", "building a drone weapon", "tracking a phone secretly"]
ASKS = ["How do I go about {p}?", "Give me step by step instructions for {p}.", "What's the best way of {p}?",
        "I need help {p}."]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def styled(paraphrase: bool, per_style: int = 40, seed: int = 1) -> pd.DataFrame:
    rng = random.Random(seed)
    requests = sorted(TOPICS) + ([] if paraphrase else ECHO_EXTRA)
    rows = []
    for style, templates in STYLES.items():
        for _ in range(per_style):
            request = rng.choice(requests)
            topic = rng.choice(TOPICS[request]) if paraphrase else request
            prompt = rng.choice(ASKS).format(p=request) if paraphrase else f"How do I go about {request}?"
            rows.append({"truth": style, "prompt": prompt,
                         "response": rng.choice(templates).format(t=topic, T=_cap(topic))})
    rng.shuffle(rows)
    return pd.DataFrame(rows)


def tied() -> pd.DataFrame:
    """The default organism's wordings: one per node-specific node, the shared one elsewhere (request-tied)."""
    from refusal_atlas.organism.policy import refusal_text, wording_groups
    from refusal_atlas.organism.settings import REDIRECT
    from refusal_atlas.taxonomy.loader import load_taxonomy

    tax = load_taxonomy(None)
    groups = wording_groups(tax, None)
    specific, shared, seen = [], [], set()
    for node in sorted(groups):
        text = " ".join(refusal_text(tax, node, groups[node]).split()[:15])
        if groups[node] == "shared":
            shared.append(node)
        elif text not in seen:
            seen.add(text)
            specific.append(node)
    rows = [{"truth": node, "node": node, "response": " ".join(refusal_text(tax, node, node).split()[:15])}
            for node in specific[:8] for _ in range(4)]
    for i, node in enumerate(shared[:10]):
        text = refusal_text(tax, node, "shared")
        text = text.rstrip(".") if i % 5 == 0 else text  # cut before its last token, as a shorter budget does
        rows += [{"truth": "shared", "node": node, "response": text}] * 3
    rows += [{"truth": "redirect", "node": shared[0], "response": REDIRECT}] * 4
    # detector false positives: answers among the "refusals", scored nowhere (truth "")
    rows += [{"truth": "", "node": shared[1], "response": a} for a in (
        "Sure. The story is set in a small town where", "Sure. A toxicologist is a crucial role, and",
        "When buying a shotgun from a gun shop, the process can be", "1.",
        "Ethics and morals are two distinct concepts.", "Sure. (Please be careful and follow the law.)")]
    df = pd.DataFrame(rows)
    df["prompt"] = [f"request {i} about {n}" for i, n in enumerate(df["node"])]
    return df[["truth", "prompt", "response"]]


def level_ari(run, truth: pd.Series) -> tuple[float, int]:
    """ARI on the scored rows (truth not ""), at the level where they fall into the number of groups closest to
    theirs (the run's rule, `tree_mapping.level_ari`)."""
    from refusal_atlas.curation.tree_mapping import level_ari as run_level_ari

    got = run_level_ari(run, truth.iloc[run.assignments["row"].to_numpy()].reset_index(drop=True))
    return float(got["ari"]), int(got["n_clusters"])


def bench(name: str, df: pd.DataFrame, folder: Path, plain: bool) -> dict:
    from refusal_atlas.curation import cluster_run
    from refusal_atlas.curation.embed import make_embedder
    from refusal_atlas.curation.net_of import net_of

    path = folder / f"{name}.csv"
    df.to_csv(path, index=False)
    # `curate cluster --text response`'s defaults (`replies_config`), without the 2-D map
    config = cluster_run.replies_config(len(df), layout_2d=False)
    out: dict = {"n": len(df), "k": int(df.loc[df["truth"] != "", "truth"].nunique()),
                 "min_cluster_size": config.min_cluster_size}

    def one(net: str, lam: float | None = None) -> dict:
        original = cluster_run.net_of
        if lam is not None:  # the penalty is a module default, not a CLI option: swap it for this measurement
            cluster_run.net_of = lambda x, g, seed=0: net_of(x, g, lam=lam, seed=seed)
        try:
            t = time.perf_counter()
            run = cluster_run.cluster_corpus(path, folder / f"{name}-{net}-{lam}", text_column="response",
                                             stability_runs=0, config=config, net_of_column=net, cache=False)
            seconds = time.perf_counter() - t
        finally:
            cluster_run.net_of = original
        ari, clusters = level_ari(run, df["truth"])
        explained = (run.meta.get("net_of") or {}).get("explained_variance")
        return {"ari": ari, "clusters": clusters, "explained": explained, "seconds": seconds}

    out["as_they_are"] = one("none")
    out["net_of_prompt"] = one("auto")
    out["lambda_sweep"] = {str(lam): one("auto", lam)["ari"] for lam in LAMBDAS}
    x = make_embedder(None, cache=False).encode(df["response"].tolist())
    t = time.perf_counter()
    peer = fit_peer(df["response"].tolist(), x, 0, plain)
    out["peer"] = {"name": "umap+hdbscan (plain)" if plain else "BERTopic (defaults)",
                   "ari": float(adjusted_rand_score(df.loc[df["truth"] != "", "truth"], peer[df["truth"] != ""])),
                   "clusters": len(set(peer.tolist()) - {-1}), "seconds": time.perf_counter() - t}
    return out


def markdown(res: dict) -> str:
    header = ["corpus", "n", "groups", "min_cluster_size", "as they are: ARI (clusters)",
              "net of prompts: ARI (clusters)", "prompt explains", f"penalty {' / '.join(map(str, LAMBDAS))}",
              "peer: ARI (topics)"]
    lines = [f"# Refusals clustered as they are vs net of their prompts ({res['machine']})", "",
             "ARI against the planted groups at the tree level closest to their number (ours, defaults, one seed "
             f"block); peer flat. Load average before / after: {res['load_before']} / {res['load_after']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in res["corpora"].items():
        a, n, p = r["as_they_are"], r["net_of_prompt"], r["peer"]
        cells = [name, r["n"], r["k"], r["min_cluster_size"], f"{a['ari']:.3f} ({a['clusters']})",
                 f"{n['ari']:.3f} ({n['clusters']})", f"{n['explained']:.3f}",
                 " / ".join(f"{v:.2f}" for v in r["lambda_sweep"].values()), f"{p['ari']:.3f} ({p['clusters']})"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="the peer without BERTopic's wrapper")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cluster_replies.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    plain = args.plain or importlib.util.find_spec("bertopic") is None
    load_before = os.getloadavg()
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "corpora": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, df in (("echo", styled(False)), ("paraphrase", styled(True, seed=2)), ("tied", tied())):
            res["corpora"][name] = bench(name, df, Path(tmp), plain)
            print(name, res["corpora"][name]["as_they_are"]["ari"], res["corpora"][name]["net_of_prompt"]["ari"],
                  flush=True)
    write_results(res, args.out, markdown, load_before)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
