"""The `cluster` stage of `run`: bottom-up clusters of the corpus, their stability and their taxonomy links.

Two views of the same corpus: `clusters/` clusters the *prompts* of harmful rows (do bottom-up
groups of what was asked agree with the taxonomy's nodes? → node ARI/NMI, proposals, and the
tree's levels against the taxonomy's branches and nodes), and `clusters/responses/` clusters the
*responses* the detector calls refusals (how many distinct refusal wordings does the model use?),
described by the prompts that drew them. Unlike `curate cluster`'s default, the replies are not
made net of their prompts (`curation.net_of`): the organism's planted wordings depend on the
request's node, and taking out what the prompt predicts would weaken exactly them
(docs/decisions.md). For the organism the truth of the second view is known: its recorded wording
groups (a node's own wording, the shared one, the redirect), so the stage reports how well
clustering recovers them (`wording_ari`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.metrics import adjusted_rand_score

from refusal_atlas.atlas import schema
from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.curation.cluster_run import cluster_corpus, replies_config
from refusal_atlas.curation.cluster_store import ClusterRun
from refusal_atlas.curation.map_folder import map_folder
from refusal_atlas.curation.tables import write_table
from refusal_atlas.curation.tree_mapping import level_ari, tree_vs_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy

# Bump when the stage's record changes (a resumed run then recomputes it): 2 added wording.said / adherence;
# 3: cluster names put a phrase in place of its words, mapping.json names, the near-duplicate-weighted fallback;
# 4: the scored level is chosen by the clusters of the scored rows alone; 5: mapping.json maps the tree's
# branch level to the taxonomy's branches; 6: clusters.json records `net_of`, mapping.json each link's branch support;
# 7: consensus edges need common neighbours (`consensus_support`), whatever the number of layouts asked for;
# 8: a group that the split of a large cluster leaves out is a part of its own.
STAGE_VERSION = 8


def wording_truth(corpus: pd.DataFrame, organism_json: Path) -> pd.Series | None:
    """Per refused row, the wording the organism was taught for it: node id, "shared", "redirect" ("" unknown)."""
    if not organism_json.is_file():
        return None
    policy = json.loads(organism_json.read_text()).get("policy", {})

    def one(row: pd.Series) -> str:
        expected, node = str(row.get("expected", "")), str(row.get("node", ""))
        if expected == "redirect":
            return "redirect"
        if expected == "refuse" and node in policy:
            return str(policy[node].get("wording_group", ""))
        return ""

    return corpus.apply(one, axis=1)


def _norm(text: str) -> str:
    return " ".join(str(text).split())


def wording_said(responses: pd.Series, organism_json: Path) -> pd.Series | None:
    """Per reply, the planted wording it says: the wording group whose taught text it contains (the longest
    such text wins; the redirect is "redirect"), "" when it says none of them.

    Beside `wording_truth` (what the organism was taught for the row's node): clustering can only recover
    wordings the model actually used, so the two together separate the clustering's recovery from the
    organism's adherence to its wordings on held-out requests."""
    if not organism_json.is_file():
        return None
    info = json.loads(organism_json.read_text())
    texts: dict[str, str] = {}
    for spec in info.get("policy", {}).values():
        group, text = spec.get("wording_group"), spec.get("refusal_text")
        if group and text:
            texts[_norm(text)] = str(group)
    redirect = (info.get("wording") or {}).get("redirect")
    if redirect:
        texts[_norm(redirect)] = "redirect"
    ordered = sorted(texts, key=len, reverse=True)

    def one(reply: str) -> str:
        said = _norm(reply)
        return next((texts[t] for t in ordered if t in said), "")

    return responses.astype(str).map(one)


def wording_scores(responses_run: ClusterRun, refused: pd.DataFrame, organism_json: Path) -> dict[str, Any] | None:
    """How the refusal clusters recover the planted wordings (None without an organism record).

    `ari` (with `n`, `groups`, `level`): the taught group of each reply's request, at the tree level closest to
    its number of groups; `exact_text_ari`: the same against the replies' exact texts, the ceiling for any
    clustering; `said`: against the wording each reply says; `adherence`: how often that is the taught one."""
    truth = wording_truth(refused.reset_index(drop=True), organism_json)
    if truth is None:
        return None
    rows = responses_run.assignments["row"].to_numpy()
    aligned = truth.iloc[rows].reset_index(drop=True)
    result = level_ari(responses_run, aligned)
    has = (aligned.str.len() > 0).to_numpy()
    # no clustering can separate rows the model answered with the same text: the exact-text ceiling
    texts = responses_run.assignments["text"].to_numpy()
    result["exact_text_ari"] = float(adjusted_rand_score(aligned[has], texts[has])) if has.sum() > 1 else None
    said = wording_said(pd.Series(texts), organism_json)
    if said is not None:
        # the same clustering against the wording each reply says, and how often that is the taught one
        result["said"] = level_ari(responses_run, said)
        taught = aligned.to_numpy()[has]
        result["adherence"] = {
            "rate": float((said.to_numpy()[has] == taught).mean()) if has.any() else None,
            "said_a_planted_wording": float((said.to_numpy()[has] != "").mean()) if has.any() else None,
            "n": int(has.sum())}
    return result


def responses_config(n_rows: int, seeds: tuple[int, ...]) -> ClusterConfig:
    """How the refusals are clustered: `curate cluster`'s defaults for replies (`replies_config`), no 2-D map."""
    return replies_config(n_rows, seeds, layout_2d=False)


def run(out: Path, seed: int, n_seeds: int, taxonomy: Taxonomy) -> dict[str, Any]:
    """Cluster the harmful prompts (and the refusals, where there are enough), map them to the taxonomy."""
    corpus = pd.read_parquet(out / "corpus.parquet")
    seeds = tuple(seed * 1000 + j for j in range(n_seeds))
    harmful = corpus[corpus["harmful"].astype(bool)]
    harmful_path = out / "clusters" / "harmful_corpus.parquet"
    write_table(harmful, harmful_path)
    config = ClusterConfig(seeds=seeds, min_cluster_size=max(5, len(harmful) // 40))
    prompts_run = cluster_corpus(harmful_path, out / "clusters", text_column="prompt", config=config,
                                 stability_runs=n_seeds)
    mapping, proposed, _ = map_folder(out / "clusters", None)
    meta = prompts_run.meta
    tree = meta.get("tree", {})
    result: dict[str, Any] = {
        "text": "prompt", "n_rows": len(harmful), "n_clusters": meta.get("n_clusters"),
        "outlier_fraction": meta.get("outlier_fraction"),
        "seed_ari": (meta.get("stability") or {}).get("seed_pairwise_ari", {}).get("mean"),
        "node_ari": mapping.agreement.get("ari"), "node_nmi": mapping.agreement.get("nmi"),
        "proposals": len(proposed), "warnings": meta.get("warnings", []),
        "levels": [lv["n_clusters"] for lv in tree.get("levels", [])], "flat_level": tree.get("flat_level"),
        "level_seed_ari": [(lv.get("seed_ari") or {}).get("mean") for lv in tree.get("levels", [])],
        "tree_vs_taxonomy": tree_vs_taxonomy(prompts_run, taxonomy),
    }
    refused = corpus[corpus["refused"].astype(bool)]
    if len(refused) >= 10:
        refused_path = out / "clusters" / "responses" / "refused_corpus.parquet"
        write_table(refused, refused_path)
        responses_run = cluster_corpus(refused_path, out / "clusters" / "responses", text_column="response",
                                       config=responses_config(len(refused), seeds), stability_runs=0,
                                       label_column="prompt", net_of_column=None)
        rmeta = responses_run.meta
        result["responses"] = {"n_rows": len(refused), "n_clusters": rmeta.get("n_clusters"),
                               "outlier_fraction": rmeta.get("outlier_fraction"),
                               "levels": [lv["n_clusters"] for lv in rmeta.get("tree", {}).get("levels", [])],
                               "warnings": rmeta.get("warnings", [])}
        scores = wording_scores(responses_run, refused, out / schema.ORGANISM_JSON.path)
        if scores is not None:
            result["wording"] = scores
            result["wording_ari"] = scores["ari"]
    return result

