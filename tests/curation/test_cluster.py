"""Clustering: planted groups recovered, order-independent, persisted assignments reload, fallbacks, CLI."""

from __future__ import annotations

import itertools
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
    Consensus,
    ExactKnn,
    KnnGraph,
    UmapReducer,
    ctfidf_keywords,
    representatives,
)
from refusal_atlas.curation.cluster_run import cluster_corpus
from refusal_atlas.curation.cluster_store import load_run
from refusal_atlas.curation.dedup import collapse_near_duplicates
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


def test_paraphrases_of_one_request_are_one_cluster_not_outliers():
    # twenty re-wordings collapse to a representative or two; their rows still count as a group
    texts = [f"How do I pick the lock on door number {i}?" for i in range(20)]
    x = Embedder(cache=False).encode(texts)
    res = ClusterPipeline(ClusterConfig(layout_2d=False)).fit(x, texts)
    assert res.method == "agglomerative-fallback"
    assert res.n_clusters == 1 and (res.labels != OUTLIER).all()
    # and one unrelated request alone stays an outlier: weights do not make singletons clusters
    odd = ["Name three jazz pianists."]
    res = ClusterPipeline(ClusterConfig(layout_2d=False)).fit(
        np.vstack([x, Embedder(cache=False).encode(odd)]), texts + odd)
    assert res.labels[-1] == OUTLIER and (res.labels[:-1] != OUTLIER).all()


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
    assert [{k: r[k] for k in ("source", "row", "reason")} for r in rejects] == \
        [{"source": str(corpus), "row": 6, "reason": "empty response"}]
    assert rejects[0]["record"]["prompt_id"] == "cooking-5"  # the rejected row itself is kept
    assert len(run.assignments) == 119 and 5 not in run.assignments["row"].tolist()  # 0-based; rejects: 1-based
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


# ----------------------------------------------------------------------------- near-duplicate collapse


def _planted_vectors() -> tuple[np.ndarray, list[int]]:
    """Three base directions with 4, 3 and 1 noisy copies (cosine ≈ 0.99) and two distinct singletons."""
    rng = np.random.default_rng(0)
    bases = np.linalg.qr(rng.normal(size=(64, 5)))[0].T  # five orthonormal directions
    family = [0, 0, 0, 0, 1, 1, 1, 2, 3, 4]
    x = bases[family] + 0.01 * rng.normal(size=(len(family), 64))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), family


def test_collapse_groups_planted_duplicates_exactly():
    x, family = _planted_vectors()
    out = collapse_near_duplicates(x, threshold=0.9)
    assert len(out.representatives) == 5 and out.n_collapsed == 5
    groups = out.group.tolist()
    # rows share a group exactly when they are copies of the same base direction
    for i, j in itertools.combinations(range(len(family)), 2):
        assert (groups[i] == groups[j]) == (family[i] == family[j]), (i, j)
    assert [family[r] for r in out.representatives] == [0, 1, 2, 3, 4]  # groups numbered by first row
    assert (out.similarity >= 0.9).all() and (out.similarity[out.representatives] == 1.0).all()


def test_collapse_is_a_no_op_on_distinct_texts(data):
    df, x = data  # 120 distinct planted prompts sharing six templates; the closest pair has cosine ≈ 0.88
    out = collapse_near_duplicates(x, threshold=0.9)
    assert out.n_collapsed == 0
    np.testing.assert_array_equal(out.representatives, np.arange(len(df)))
    np.testing.assert_array_equal(out.group, np.arange(len(df)))


def test_collapse_cap_and_switch_off():
    x, _ = _planted_vectors()
    capped = collapse_near_duplicates(x, threshold=0.9, max_representatives=2)
    assert len(capped.representatives) == 2
    assert capped.group.tolist() == [0, 0, 0, 0, 1, 1, 1, -1, -1, -1]  # the rest is left to kNN assignment
    off = collapse_near_duplicates(x, threshold=1.0)
    np.testing.assert_array_equal(off.group, np.arange(len(x)))


def test_templated_copies_do_not_multiply_clusters(data, fitted):
    """Each planted prompt re-worded three ways: still the four topics, copies share their prompt's cluster."""
    df, _ = data
    frames = ["Please {}", "Quick question: {} Thanks!", "For a novel I am writing, {}"]
    texts = [f.format(p) for p in df["prompt"] for f in frames]
    x = Embedder(cache=False).encode(texts)
    res = ClusterPipeline(ClusterConfig(min_cluster_size=10, layout_2d=False)).fit(x, texts)
    group = np.repeat(df["group"].to_numpy(), len(frames))
    assert res.n_clusters <= 5 and adjusted_rand_score(group, res.labels) >= 0.85
    assert res.fitted.sum() < len(texts) and (res.representative >= 0).all()
    np.testing.assert_array_equal(res.labels, res.labels[res.representative])
    plain = ClusterPipeline(ClusterConfig(min_cluster_size=10, layout_2d=False, dedup_threshold=1.0)).fit(x, texts)
    assert plain.fitted.all()


def test_umap_layouts_share_one_deterministic_initialisation(data):
    _, x = data
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    knn = ExactKnn(15).fit(x)
    reducer = UmapReducer(n_components=5)
    first = reducer.initial_layout(x, knn, 5)
    assert reducer.initial_layout(x, knn, 5) is first  # computed once per graph, reused by every seed
    np.testing.assert_allclose(UmapReducer().initial_layout(x, knn, 5), first, atol=1e-5)
    assert np.abs(first).max() == pytest.approx(10.0)


def test_disconnected_graph_falls_back_to_per_seed_initialisation():
    """Two groups that share no kNN edge: no shared spectral start, the layout still runs."""
    rng = np.random.default_rng(1)
    x = np.zeros((40, 64), dtype=np.float32)
    x[:20, :32] = rng.normal(size=(20, 32)) + 5.0
    x[20:, 32:] = rng.normal(size=(20, 32)) + 5.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    knn = ExactKnn(15).fit(x)
    reducer = UmapReducer(n_components=2, n_epochs=20)
    assert reducer.initial_layout(x, knn, 2) is None
    assert reducer.fit_transform(x, knn, seed=0).shape == (40, 2)


def test_cluster_names_put_a_phrase_in_place_of_its_words():
    from refusal_atlas.curation.cluster_describe import cluster_name

    # c-TF-IDF ranks a phrase after its own words as often as before them
    assert cluster_name(["instructions", "detailed", "detailed instructions", "gun", "use"]) == \
        "detailed instructions / gun / use"
    assert cluster_name(["nerve gas", "nerve", "gas", "pipe bomb", "pipe"]) == "nerve gas / pipe bomb"
    assert cluster_name(["a", "b", "c", "d", "b c"]) == "a / b c / d"
    assert cluster_name([]) == ""


def _two_groups_and_a_bridge() -> tuple[np.ndarray, KnnGraph]:
    """Groups A (rows 0–11) and B (12–23), each row's neighbours its own group; one kNN edge a0–b0 joins them.

    Ten runs: six put everything in one cluster, two move a0 into B, two keep the groups apart. So
    every in-group edge and the a0–b0 edge are co-clustered in at least 8 of 10 runs, and only
    that one edge joins the groups."""
    a, b = list(range(12)), list(range(12, 24))
    indices = np.array([[j for j in (a if i in a else b) if j != i] for i in range(24)], dtype=np.int64)
    indices[0, -1], indices[12, -1] = 12, 0  # the bridge replaces each end's last neighbour
    knn = KnnGraph(indices, np.zeros(indices.shape, dtype=np.float32))
    apart = np.array([0] * 12 + [1] * 12)
    a0_in_b = apart.copy()
    a0_in_b[0] = 1
    runs = np.stack([np.zeros(24, dtype=np.int64)] * 6 + [a0_in_b] * 2 + [apart] * 2)
    return runs, knn


def test_one_chain_of_edges_does_not_join_two_cores():
    runs, knn = _two_groups_and_a_bridge()
    joined, _ = Consensus(0.7, 10, 0.3, support=0).combine(runs, knn)
    assert len(set(joined.tolist())) == 1  # the bridge alone makes one component of 24
    labels, _ = Consensus(0.7, 10, 0.3, support=2).combine(runs, knn)
    assert adjusted_rand_score([0] * 12 + [1] * 12, labels) == 1.0


def test_supported_edges_keep_a_smallest_cluster():
    """A cluster of `min_cluster_size` rows whose members share fewer than `support` neighbours still forms."""
    indices = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]], dtype=np.int64)
    knn = KnnGraph(indices, np.zeros(indices.shape, dtype=np.float32))
    runs = np.array([[0, 0, 0, 1, 1, 1]] * 4)
    labels, _ = Consensus(0.7, 3, 0.3, support=2).combine(runs, knn)  # a triangle: one common neighbour per edge
    assert adjusted_rand_score([0, 0, 0, 1, 1, 1], labels) == 1.0
    assert (labels != OUTLIER).all()


def test_a_group_the_split_leaves_out_is_a_part_not_merged_into_a_neighbour():
    """Inside a cluster being split: two parts found, a third group all outliers (HDBSCAN calls a looser group
    noise in about half of the layouts). It becomes a part of its own; too few scattered outliers do not."""
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:3] * 3.0
    x = np.vstack([centres[g] + rng.normal(scale=0.4, size=(20, 16)) for g in range(3)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sub = np.array([0] * 20 + [1] * 20 + [OUTLIER] * 20)
    pipe = ClusterPipeline(ClusterConfig(min_cluster_size=10))
    out = pipe._outlier_groups(x.astype(np.float32), sub)
    assert (out[:40] == sub[:40]).all()
    assert len(set(out[40:].tolist())) == 1 and out[40] not in (OUTLIER, 0, 1)
    few = sub.copy()
    few[40:52] = 1  # 8 left out: fewer than min_cluster_size, so they stay outliers (the caller assigns them)
    assert (pipe._outlier_groups(x.astype(np.float32), few) == few).all()
