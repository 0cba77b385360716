"""Clustering: planted groups recovered, order-independent, persisted assignments reload, fallbacks, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from curation_cluster_fixtures import planted
from refusal_atlas.curation.cluster import (
    OUTLIER,
    ClusterConfig,
    ClusterPipeline,
    ctfidf_keywords,
    representatives,
)
from refusal_atlas.curation.cluster_run import cluster_corpus
from refusal_atlas.curation.cluster_store import load_run
from refusal_atlas.curation.embed import Embedder
from refusal_atlas.errors import AtlasError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    df = planted()
    x = Embedder(cache_root=tmp_path_factory.mktemp("emb")).encode(df["prompt"].tolist())
    return df, x


@pytest.fixture(scope="module")
def fitted(data):
    df, x = data
    return ClusterPipeline(ClusterConfig(min_cluster_size=10)).fit(x, df["prompt"].tolist())


def test_planted_groups_are_recovered(data, fitted):
    df, _ = data
    assert fitted.method == "consensus-umap-hdbscan"
    assert fitted.n_clusters == 4
    assert adjusted_rand_score(df["group"], fitted.labels) >= 0.9
    assert fitted.outlier_fraction <= 0.05
    assert fitted.layout_2d is not None and fitted.layout_2d.shape == (len(df), 2)
    # keywords name the planted topic; representatives are members of their cluster
    for c, words in fitted.keywords.items():
        if c == OUTLIER:
            continue
        group = df["group"][fitted.labels == c].mode()[0]
        vocab = " ".join(df["prompt"][df["group"] == group]).lower()
        assert all(w.split()[0] in vocab for w in words[:5])
        assert all(fitted.labels[i] == c for i in fitted.representatives[c])


def test_row_order_does_not_matter(data, fitted):
    df, x = data
    perm = np.random.default_rng(3).permutation(len(df))
    again = ClusterPipeline(ClusterConfig(min_cluster_size=10, layout_2d=False)).fit_labels(
        x[perm], df["prompt"].iloc[perm].tolist())[0]
    np.testing.assert_array_equal(again, fitted.labels[perm])


def test_large_corpus_path_fits_a_sample_and_assigns_the_rest(data):
    df, x = data
    res = ClusterPipeline(ClusterConfig(min_cluster_size=5, max_fit=60, layout_2d=False)).fit(
        x, df["prompt"].tolist())
    assert res.fitted.sum() == 60 and (~res.fitted).sum() == len(df) - 60
    assert adjusted_rand_score(df["group"], res.labels) >= 0.8


def test_small_corpus_falls_back_to_agglomerative(data):
    df, x = data
    pick = np.r_[0:4, 30:34]  # four cooking and four hacking prompts: fewer than n_neighbors + 2
    res = ClusterPipeline(ClusterConfig()).fit(x[pick], df["prompt"].iloc[pick].tolist())
    assert res.method == "agglomerative-fallback"
    assert res.layout_2d is None
    assert adjusted_rand_score(df["group"].iloc[pick], res.labels) == 1.0


def test_outlier_reassignment_is_recorded(data):
    df, x = data
    odd = ["Translate 'good morning' into Japanese.", "What is 17 times 23?", "Name three jazz pianists."]
    texts = df["prompt"].tolist() + odd
    xx = np.vstack([x, Embedder(cache=False).encode(odd)])
    plain = ClusterPipeline(ClusterConfig(layout_2d=False)).fit(xx, texts)
    moved = ClusterPipeline(ClusterConfig(layout_2d=False, reassign_outliers=True,
                                          reassign_min_similarity=-1.0)).fit(xx, texts)
    assert not plain.reassigned.any()
    assert (moved.labels != OUTLIER).all()
    np.testing.assert_array_equal(moved.reassigned, plain.labels == OUTLIER)


def test_min_cluster_fraction_raises_the_minimum():
    assert ClusterPipeline(ClusterConfig(min_cluster_size=10)).min_size(5000) == 10
    assert ClusterPipeline(ClusterConfig(min_cluster_size=10, min_cluster_fraction=0.01)).min_size(5000) == 50
    assert ClusterPipeline(ClusterConfig(min_cluster_size=10, min_cluster_fraction=0.01)).min_size(500) == 10


def test_ctfidf_prefers_distinctive_words():
    texts = ["apple pie recipe", "apple crumble recipe", "server exploit code", "exploit the server login"]
    kw = ctfidf_keywords(texts, np.array([0, 0, 1, 1]), n_keywords=3)
    assert "apple" in kw[0] and "exploit" in kw[1] and "exploit" not in kw[0]
    x = np.eye(4, dtype=np.float32)
    reps = representatives(x, np.array([0, 0, 1, -1]), texts, k=5)
    assert set(reps) == {0, 1} and sorted(reps[0]) == [0, 1]


# ----------------------------------------------------------------------------- persisted runs and CLI


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    df = planted()
    df.loc[5, "response"] = "   "  # an empty response: rejected with its row number
    path = folder / "corpus.parquet"
    df.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("REFUSAL_ATLAS_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield cluster_corpus(corpus, corpus.parent / "clusters", text_column="response",
                             config=ClusterConfig(min_cluster_size=10), stability_runs=2)
    finally:
        mp.undo()


def test_run_folder_is_complete_and_reloads_identically(run, corpus):
    folder = run.folder
    for name in ("assignments.parquet", "embeddings.npy", "clusters.json", "stability.json",
                 "map.html", "sizes.html", "stability.html"):
        assert (folder / name).is_file(), name
    rejects = [json.loads(line) for line in (folder / "assignments.parquet.rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": str(corpus), "row": 6, "reason": "empty response"}]
    assert len(run.assignments) == 119 and 6 not in run.assignments["row"].tolist()
    again = load_run(folder)
    pd.testing.assert_frame_equal(again.assignments, run.assignments)
    np.testing.assert_array_equal(again.embeddings, run.embeddings)
    meta = again.meta
    assert meta["n_clusters"] == 4 and meta["input"]["rejected"] == 1
    assert meta["embedder"]["model"] and meta["config"]["min_cluster_size"] == 10
    assert {c["id"] for c in meta["clusters"]} >= {0, 1, 2, 3}
    assert all(c["representatives"] for c in meta["clusters"] if c["id"] != OUTLIER)
    assert {"node", "refused", "prompt_id"} <= set(again.assignments.columns)


def test_cli_cluster_errors_are_one_line(tmp_path, corpus):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,other\nhello,1\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "curate", "cluster", str(bad),
                           "-o", str(tmp_path / "out"), "--text", "response"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "response" in lines[0] and "Traceback" not in proc.stderr

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"response": ""}) + "\n" + json.dumps({"response": "  "}) + "\n")
    with pytest.raises(AtlasError, match="no rows with a non-empty response"):
        cluster_corpus(empty, tmp_path / "out2", stability_runs=0)
    assert len((tmp_path / "out2" / "assignments.parquet.rejects.jsonl").read_text().splitlines()) == 2
    with pytest.raises(AtlasError, match="refused"):
        cluster_corpus(bad, tmp_path / "out3", text_column="prompt", only_refused=True, stability_runs=0)


def test_cli_cluster_runs(tmp_path, corpus, monkeypatch):
    from refusal_atlas.cli import app

    monkeypatch.setenv("REFUSAL_ATLAS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "clusters"
    result = CliRunner().invoke(app, ["curate", "cluster", str(corpus), "--text", "prompt", "--only-refused",
                                      "--stability-runs", "0", "--seeds", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "60 rows -> 2 clusters" in result.output
    meta = json.loads((out / "clusters.json").read_text())
    assert meta["input"]["only_refused"] is True and meta["config"]["seeds"] == [0, 1, 2]
