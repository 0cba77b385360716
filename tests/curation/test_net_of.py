"""Clustering texts net of another column: planted styles under echoed topics, the rule `auto`, mapping vectors."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.curation.cluster_run import cluster_corpus, resolve_net_of, select_rows
from refusal_atlas.curation.cluster_store import load_run
from refusal_atlas.curation.embed import make_embedder
from refusal_atlas.curation.map_folder import map_folder
from refusal_atlas.curation.mapping import description_vectors
from refusal_atlas.curation.net_of import net_of
from refusal_atlas.errors import AtlasError


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("REFUSAL_ATLAS_CACHE", str(tmp_path_factory.getbasetemp() / "emb-cache"))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _planted_vectors(n: int = 300, seed: int = 0):
    """Texts = a weak style direction + a strong topic direction the given column carries too."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0]
    styles, topics = basis[:4], basis[4:24]
    style = rng.integers(0, 4, n)
    topic = rng.integers(0, 20, n)
    x = _unit(styles[style] + 2.5 * topics[topic] + 0.1 * rng.normal(size=(n, 64)))
    given = _unit(topics[topic] + 0.1 * rng.normal(size=(n, 64)))
    return x.astype(np.float32), given.astype(np.float32), style, topic


def _kmeans_ari(x: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(adjusted_rand_score(truth, KMeans(k, n_init=10, random_state=0).fit_predict(x)))


def test_residual_keeps_the_style_the_topic_hides():
    x, given, style, _ = _planted_vectors()
    assert _kmeans_ari(x, style, 4) < 0.2  # raw vectors group by topic
    made = net_of(x, given)
    assert _kmeans_ari(made.vectors, style, 4) > 0.95
    assert 0.3 < made.explained < 0.9 and made.fitted_rows == len(x)  # the topic is most of the variance
    assert np.allclose(np.linalg.norm(made.vectors, axis=1), 1.0, atol=2e-3)
    again = net_of(x.copy(), given.copy())
    assert np.array_equal(again.vectors, made.vectors)


def test_a_sampled_fit_gives_the_same_groups():
    x, given, style, _ = _planted_vectors(n=600, seed=1)
    sampled = net_of(x, given, max_fit=200, seed=3)
    assert sampled.fitted_rows == 200
    assert _kmeans_ari(sampled.vectors, style, 4) > 0.95


def test_bad_shapes_and_penalties_are_errors():
    x, given, *_ = _planted_vectors(n=40)
    with pytest.raises(AtlasError, match="do not pair up"):
        net_of(x, given[:-1])
    with pytest.raises(AtlasError, match="lambda must be > 0"):
        net_of(x, given, lam=0.0)


def test_auto_rule():
    assert resolve_net_of("auto", "response", ["prompt", "response"]) == "prompt"
    assert resolve_net_of("auto", "response", ["objective", "response"]) is None
    assert resolve_net_of("auto", "prompt", ["prompt", "response"]) is None
    assert resolve_net_of("none", "response", ["prompt", "response"]) is None
    assert resolve_net_of("objective", "response", ["objective", "response"]) == "objective"
    assert resolve_net_of("response", "response", ["response"]) is None


def test_an_empty_cell_of_the_column_is_a_reject_not_an_empty_text(tmp_path):
    df = pd.DataFrame({"prompt": ["a", "", "c"], "response": ["x", "y", "z"]}, index=pd.RangeIndex(1, 4))
    sel = select_rows(df, tmp_path / "in.csv", "response", False, net_column="prompt")
    assert sel.net_texts == ["a", "c"] and [r["row"] for r in sel.rejects] == [2]
    assert "empty prompt" in sel.rejects[0]["reason"]
    with pytest.raises(AtlasError, match="--net-of names the column"):
        select_rows(df, tmp_path / "in.csv", "response", False, net_column="request")


STYLES = {
    "apology": ["I'm sorry, but I can't help with {t}.", "Sorry, I can't assist with {t}.",
                "Apologies, but I can't provide help with {t}."],
    "policy": ["As an AI language model, I must decline requests about {t} because it violates my guidelines.",
               "My guidelines do not allow me to help with {t}, as an AI assistant."],
    "illegal": ["{T} is illegal and can lead to serious criminal charges. I strongly advise against it.",
                "Please be aware that {t} is against the law and could result in prison time."],
    "redirect": ["Please talk to a counselor or the appropriate authorities rather than {t}.",
                 "Consider contacting a qualified professional who can help you safely, rather than {t}."],
}
TOPICS = {"making a pipe bomb": ["explosives", "bomb-making"], "hacking a bank": ["cyberattacks on banks",
          "breaking into financial systems"], "stalking my ex": ["stalking", "following a former partner"],
          "laundering money": ["hiding illicit funds", "money laundering"], "making meth": ["drug synthesis",
          "producing illegal drugs"], "forging a passport": ["document forgery", "fake identity documents"],
          "poisoning a dog": ["animal cruelty", "hurting a pet"], "phishing emails": ["scam messages",
          "credential theft"]}


def _planted_replies(n_per_style: int = 30) -> pd.DataFrame:
    """Four refusal styles, each worded over the same requests; replies paraphrase the request's topic."""
    rng = random.Random(0)
    rows = []
    for style, templates in STYLES.items():
        for _ in range(n_per_style):
            request = rng.choice(sorted(TOPICS))
            topic = rng.choice(TOPICS[request])
            rows.append({"style": style, "prompt": f"How do I go about {request}?",
                         "response": rng.choice(templates).format(t=topic, T=topic[0].upper() + topic[1:])})
    rng.shuffle(rows)
    return pd.DataFrame(rows)


def _level_ari(run, truth: pd.Series) -> float:
    a = run.assignments
    k = truth.nunique()
    counts = [lv["n_clusters"] for lv in run.meta["tree"]["levels"]] or [run.meta["n_clusters"]]
    level = min(range(len(counts)), key=lambda i: (abs(counts[i] - k), -i))
    column = f"cluster_level_{level}" if f"cluster_level_{level}" in a.columns else "cluster"
    return float(adjusted_rand_score(truth.iloc[a["row"].to_numpy()], a[column]))


def test_replies_cluster_by_wording_net_of_their_prompts(tmp_path):
    df = _planted_replies()
    path = tmp_path / "replies.csv"
    df.to_csv(path, index=False)
    config = ClusterConfig(layout_2d=False)
    raw = cluster_corpus(path, tmp_path / "raw", text_column="response", stability_runs=0, config=config)
    net = cluster_corpus(path, tmp_path / "net", text_column="response", stability_runs=0, config=config,
                         net_of_column="auto")
    assert raw.meta["net_of"] is None and net.meta["net_of"]["column"] == "prompt"
    assert 0.0 < net.meta["net_of"]["explained_variance"] < 1.0
    # measured: raw 0.28 (replies group by the requests they echo), net of the prompts 1.00
    assert _level_ari(raw, df["style"]) < 0.5
    assert _level_ari(net, df["style"]) >= 0.9
    assert net.run_id != raw.run_id


@pytest.mark.parametrize("block", [1, 2])
def test_planted_wordings_hold_in_other_seed_blocks(tmp_path, block):
    # measured: blocks 1-3 merged the "illegal" and "redirect" styles (ARI 0.688) until a group the split of
    # their shared cluster leaves out became a part of its own; now 1.000 in blocks 0-5 at 12, 24 and 32 layouts
    df = _planted_replies()
    path = tmp_path / "replies.csv"
    df.to_csv(path, index=False)
    config = ClusterConfig(layout_2d=False).with_seed_base(block)
    net = cluster_corpus(path, tmp_path / "net", text_column="response", stability_runs=0, config=config,
                         net_of_column="auto")
    assert _level_ari(net, df["style"]) >= 0.9


def test_clusters_made_net_of_a_column_are_mapped_in_the_texts_own_space(tmp_path):
    df = _planted_replies(n_per_style=12)
    path = tmp_path / "replies.csv"
    df.to_csv(path, index=False)
    cluster_corpus(path, tmp_path / "net", text_column="response", stability_runs=0, net_of_column="prompt",
                   config=ClusterConfig(seeds=(0, 1), layout_2d=False, min_cluster_size=5))
    run = load_run(tmp_path / "net")
    vecs = description_vectors(run)
    expected = make_embedder(None).encode(run.texts)
    # the stored vectors are residuals; mapping compares the replies themselves with the node texts
    assert not np.allclose(run.embeddings, expected, atol=1e-2)
    assert np.allclose(vecs, _unit(expected), atol=1e-3)
    assert description_vectors(run) is vecs  # kept for the later steps


def test_identical_replies_have_nothing_left_and_group_together(tmp_path):
    # every reply the same text: each residual is rounding noise, whose direction would be arbitrary
    x = np.tile(_unit(np.random.default_rng(0).normal(size=(1, 32))), (6, 1)).astype(np.float32)
    x[4:] = _unit(np.random.default_rng(1).normal(size=(2, 32)))
    given = _unit(np.random.default_rng(2).normal(size=(6, 32))).astype(np.float32)
    made = net_of(x, given)
    assert made.nothing_left == 0  # two texts: the residuals carry which one
    same = net_of(x[:4], given[:4])
    assert same.nothing_left == 4 and np.all(same.vectors == same.vectors[0])
    assert np.isclose(np.linalg.norm(same.vectors[0]), 1.0, atol=2e-3)
    path = tmp_path / "same.csv"
    pd.DataFrame({"prompt": ["how to x", "how to y", "how to z"], "response": ["no way"] * 3}).to_csv(path, index=False)
    run = cluster_corpus(path, tmp_path / "out", text_column="response", stability_runs=0, net_of_column="auto",
                         config=ClusterConfig(seeds=(0,), layout_2d=False, min_cluster_size=2))
    assert run.meta["net_of"]["rows_with_nothing_left"] == 3 and run.assignments["cluster"].tolist() == [0, 0, 0]


def test_wording_clusters_are_not_linked_to_the_topic_their_requests_average_to(tmp_path):
    """Replies grouped by style over the same requests: each cluster's prompts spread over the taxonomy as the
    corpus's do, so no similarity link fits and no node is proposed for them, each with its reason."""
    df = _planted_replies()
    path = tmp_path / "replies.csv"
    df.to_csv(path, index=False)
    cluster_corpus(path, tmp_path / "net", text_column="response", label_column="prompt", stability_runs=0,
                   net_of_column="auto", config=ClusterConfig(layout_2d=False))
    mapping, proposed, written = map_folder(tmp_path / "net")
    assert mapping.links and all(link.method == "similarity" for link in mapping.links)
    assert all(link.unfocused and not link.fits for link in mapping.links)
    assert all(link.support["p"] >= 0.05 for link in mapping.links)
    assert proposed == []
    body = json.loads(written["mapping"].read_text(encoding="utf-8"))
    reasons = [s["reason"] for s in body["review"]["skipped"]]
    assert len(reasons) == len(mapping.links) and all(r.startswith("not one source of harm") for r in reasons)
    branch_level = body["tree"]["branch_level"]["clusters"]
    assert branch_level and not any(c["fits"] for c in branch_level)
