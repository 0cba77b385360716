"""Stability measures: pairwise ARI, best-match Jaccard, seed re-runs, resamples, min_cluster_size sweep."""

from __future__ import annotations

import numpy as np
import pytest

from curation_cluster_fixtures import planted
from refusal_atlas.curation.cluster import ClusterConfig, ClusterPipeline
from refusal_atlas.curation.embed import Embedder
from refusal_atlas.curation.stability import (
    ari_phrase,
    best_match_jaccard,
    default_sweep,
    jaccard_stability,
    min_cluster_size_sweep,
    pairwise_ari,
    resample_stability,
    seed_stability,
    stability_report,
)


def test_pairwise_ari_and_jaccard_by_hand():
    a = np.array([0, 0, 1, 1, -1])
    assert pairwise_ari([a, a, a])["mean"] == pytest.approx(1.0)
    b = np.array([5, 5, 5, 7, -1])  # cluster 0 matches {0,1,2}: 2/3; cluster 1 best {3}: 1/2
    assert best_match_jaccard(a, b) == {0: pytest.approx(2 / 3), 1: pytest.approx(0.5)}
    runs = [(np.arange(5), a), (np.arange(5), b)]
    assert jaccard_stability(a, runs) == {0: pytest.approx(5 / 6), 1: pytest.approx(0.75)}
    assert default_sweep(10) == [5, 10, 20] and default_sweep(3) == [2, 3, 6]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    df = planted()
    x = Embedder(cache_root=tmp_path_factory.mktemp("emb")).encode(df["prompt"].tolist())
    config = ClusterConfig(min_cluster_size=10, layout_2d=False)
    ref = ClusterPipeline(config).fit_labels(x, df["prompt"].tolist())[0]
    return df["prompt"].tolist(), x, config, ref


def test_seed_runs_agree(data):
    texts, x, config, ref = data
    out = seed_stability(config, x, texts, n_runs=5, reference=ref)
    assert out["runs"] == 5 and out["pairwise_ari"]["pairs"] == 10
    assert out["pairwise_ari"]["min"] >= 0.9
    assert all(j >= 0.9 for j in out["jaccard"].values())


def test_resamples_and_sweep(data):
    texts, x, config, ref = data
    res = resample_stability(config, x, texts, ref, n_resamples=5)
    assert res["resamples"] == 5 and res["ari_vs_reference"]["mean"] >= 0.8
    assert set(res["jaccard"]) == set(ref.tolist()) - {-1}
    sweep = min_cluster_size_sweep(config, x, texts, [5, 40], reference=ref)
    assert [r["min_cluster_size"] for r in sweep] == [5, 40]
    assert sweep[0]["n_clusters"] >= sweep[1]["n_clusters"]


def test_report_is_json_ready(data):
    import json

    texts, x, config, ref = data
    rep = stability_report(config, x, texts, ref, n_seed_runs=2, n_resamples=2, sweep=[10])
    assert set(rep) == {"seeds", "resamples", "min_cluster_size_sweep", "per_cluster"}
    json.dumps(rep)


def test_ari_phrase_never_shows_a_bare_one_for_nothing_or_one_cluster():
    assert ari_phrase("seed ARI", {"mean": 0.9123}, 4) == "seed ARI 0.912"
    assert ari_phrase("seed ARI", {"mean": None}, 0) == "seed ARI – (nothing clustered to compare)"
    assert ari_phrase("seed ARI", None, 3).startswith("seed ARI –")
    one = ari_phrase("seed ARI", {"mean": 1.0}, 1)
    assert one.startswith("seed ARI 1.000 (") and "outliers" in one
