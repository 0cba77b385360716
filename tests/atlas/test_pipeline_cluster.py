"""The cluster stage's known answer: refusals in the organism's planted wordings are recovered from the texts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from refusal_atlas.atlas.pipeline_cluster import responses_config, wording_said, wording_truth
from refusal_atlas.curation.cluster_run import cluster_corpus
from refusal_atlas.curation.tree_mapping import level_ari
from refusal_atlas.organism.policy import refusal_text, wording_groups
from refusal_atlas.organism.settings import REDIRECT
from refusal_atlas.taxonomy.loader import load_taxonomy

WORDS = 15  # the run collects 20 new tokens: about 15 words of a refusal


def _truncate(text: str) -> str:
    return " ".join(text.split()[:WORDS])


def _corpus() -> tuple[pd.DataFrame, dict]:
    """Refused rows as the default organism is taught to word them, truncated as the run collects them.

    Nodes whose truncated wordings coincide cannot be told apart by any method; one node per
    truncated wording is kept. Detector false positives (answers, expected comply) are mixed in.
    """
    tax = load_taxonomy(None)
    groups = wording_groups(tax, None)
    specific, shared, seen = [], [], set()
    for node in sorted(groups):
        text = _truncate(refusal_text(tax, node, groups[node]))
        if groups[node] == "shared":
            shared.append(node)
        elif text not in seen:
            seen.add(text)
            specific.append(node)
    rows = []
    for node in specific[:8]:
        rows += [{"node": node, "expected": "refuse", "response": _truncate(refusal_text(tax, node, node))}] * 4
    for i, node in enumerate(shared[:10]):
        text = refusal_text(tax, node, "shared")
        text = text.rstrip(".") if i % 5 == 0 else text  # cut before its last token, as a shorter budget does
        rows += [{"node": node, "expected": "refuse", "response": text}] * 3
    rows += [{"node": shared[0], "expected": "redirect", "response": REDIRECT}] * 4
    answers = ["Sure. The story is set in a small town where", "Sure. A toxicologist is a crucial role, and",
               "When buying a shotgun from a gun shop, the process can be", "1.",
               "Ethics and morals are two distinct concepts.", "Sure. (Please be careful and follow the law.)"]
    rows += [{"node": shared[1], "expected": "comply", "response": a} for a in answers]
    df = pd.DataFrame(rows)
    df["prompt"] = [f"request {i} about {n}" for i, n in enumerate(df["node"])]
    df["refused"] = True
    policy = {n: {"wording_group": groups[n], "refusal_text": refusal_text(tax, n, groups[n])} for n in groups}
    return df, policy


# the run clusters refusals as they are; `curate cluster` takes them net of their prompts by default, which at
# its default penalty keeps these request-tied wordings (a weaker penalty, 0.03, gives 0.77: benchmarks)
@pytest.mark.parametrize("net_of", [None, "auto"])
def test_planted_wordings_are_recovered(tmp_path, monkeypatch, net_of):
    monkeypatch.setenv("REFUSAL_ATLAS_CACHE", str(tmp_path / "cache"))
    df, policy = _corpus()
    (tmp_path / "organism.json").write_text(json.dumps({"policy": policy}))
    truth = wording_truth(df, tmp_path / "organism.json")
    assert truth is not None and truth.nunique() == 8 + 1 + 1 + 1  # 8 node wordings, shared, redirect, ""
    assert (truth[df["expected"] == "comply"] == "").all() and (truth[df["expected"] == "redirect"] == "redirect").all()
    df.to_parquet(tmp_path / "refused.parquet")
    run = cluster_corpus(tmp_path / "refused.parquet", tmp_path / "out", text_column="response",
                         label_column="prompt", stability_runs=0, config=responses_config(len(df), (0, 1, 2)),
                         net_of_column=net_of)
    assert (run.meta["net_of"] or {}).get("column") == ("prompt" if net_of else None)
    result = level_ari(run, truth.iloc[run.assignments["row"].to_numpy()].reset_index(drop=True))
    assert result["groups"] == 10 and result["n"] == len(df) - 6
    assert result["ari"] >= 0.9, result
    assert wording_truth(df, tmp_path / "missing.json") is None



def test_the_wording_a_reply_says_is_told_from_what_was_taught(tmp_path):
    """`wording_said` reads the planted wording in the reply itself (the longest taught text it contains), so a
    reply in another node's wording counts as that wording, and a reply in none of them as ""."""
    tax = load_taxonomy(None)
    groups = wording_groups(tax, None)
    specific = sorted(n for n in groups if groups[n] != "shared")
    shared_node = next(n for n in sorted(groups) if groups[n] == "shared")
    a, b = specific[0], specific[1]
    policy = {n: {"wording_group": groups[n], "refusal_text": refusal_text(tax, n, groups[n])} for n in groups}
    (tmp_path / "organism.json").write_text(json.dumps({"policy": policy, "wording": {"redirect": REDIRECT}}))
    replies = pd.Series([
        refusal_text(tax, a, a),  # as taught
        "  " + refusal_text(tax, b, b).replace(" ", "\n", 2) + " More text.",  # another node's, re-spaced, run on
        refusal_text(tax, shared_node, "shared"),
        REDIRECT,
        "Sure. The story is set in a small town where",
        refusal_text(tax, a, a)[:-10],  # cut before the end: not the planted text
    ])
    said = wording_said(replies, tmp_path / "organism.json")
    assert said is not None
    assert said.tolist() == [a, b, "shared", "redirect", "", ""]
    assert wording_said(replies, tmp_path / "missing.json") is None
