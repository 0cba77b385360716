"""The clusters folder as a user joins and reads it: row ids, carried columns, tree columns, --label-by, warnings."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from curation_cluster_fixtures import planted
from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.curation.cluster_run import cluster_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("REFUSAL_ATLAS_CACHE", str(tmp_path_factory.getbasetemp() / "emb-cache"))


def test_assignments_join_back_to_the_input_with_all_columns(tmp_path):
    df = planted().rename(columns={"prompt_id": "doc_id"})
    df["score"] = np.arange(len(df)) / 10  # numeric, carried as is
    df["meta"] = [{"k": i} if i % 2 else None for i in range(len(df))]  # nested: carried as JSON text
    df["cluster"] = "user's own column"  # a name the pipeline uses itself
    df.loc[7, "response"] = ""  # rejected: its row id is skipped, the others keep theirs
    path = tmp_path / "in.jsonl"
    df.to_json(path, orient="records", lines=True)
    run = cluster_corpus(path, tmp_path / "out", text_column="response", stability_runs=0,
                         config=ClusterConfig(min_cluster_size=10, seeds=(0, 1, 2), layout_2d=False))
    a = run.assignments
    assert 7 not in set(a["row"]) and len(a) == len(df) - 1
    back = df.iloc[a["row"].to_numpy()].reset_index(drop=True)
    assert (back["response"] == a["text"]).all() and (back["doc_id"] == a["doc_id"]).all()
    assert np.allclose(back["score"], a["score"])
    assert (a["input_cluster"] == "user's own column").all() and a["cluster"].dtype.kind == "i"
    assert json.loads(a.loc[a["row"] == 1, "meta"].iloc[0]) == {"k": 1}
    assert run.meta["input"]["id_column"] == "doc_id"
    levels = [c for c in a.columns if c.startswith("cluster_level_")]
    tree = run.meta["tree"]
    assert len(levels) == len(tree["levels"]) >= 2
    flat = tree["flat_level"]
    assert (a[f"cluster_level_{flat}"] == a["cluster"]).all()
    for lv in tree["levels"][1:]:  # parents name a cluster of the next coarser level
        coarse = set(a[f"cluster_level_{lv['level'] - 1}"])
        assert all(c["parent"] in coarse for c in lv["clusters"])


def test_clustering_an_assignments_file_again_loses_none_of_its_columns(tmp_path):
    df = planted()
    df["input_cluster"] = "from an earlier carry"  # taken already: the input's `cluster` must not overwrite it
    path = tmp_path / "in.jsonl"
    df.to_json(path, orient="records", lines=True)
    config = ClusterConfig(min_cluster_size=10, seeds=(0, 1), layout_2d=True)
    first = cluster_corpus(path, tmp_path / "one", text_column="response", stability_runs=0, config=config)
    again = cluster_corpus(tmp_path / "one" / "assignments.parquet", tmp_path / "two", text_column="text",
                           stability_runs=0, config=config)
    before, after = first.assignments, again.assignments
    # every column of the first output but the clustered text is in the second, prefixed, with its values
    for col in before.columns.drop("text"):
        name = next((c for c in after.columns if c.endswith(col) and set(c[: -len(col)].split("_")) <= {"input", ""}
                     and after[c].tolist() == before[col].tolist()), None)
        assert name is not None, (col, list(after.columns))
    assert (after["input_cluster"] == "from an earlier carry").all()  # a free name is kept
    assert (after["input_input_cluster"].to_numpy() == before["cluster"].to_numpy()).all()
    assert (after["input_row"].to_numpy() == before["row"].to_numpy()).all()


def test_label_by_names_clusters_with_another_column(tmp_path):
    df = planted()
    # every response is the same two stock replies; the prompts say what was asked
    df["response"] = np.where(df["refused"], "I'm sorry, but I can't help with that.", "Sure, here you go.")
    path = tmp_path / "in.parquet"
    df.to_parquet(path)
    run = cluster_corpus(path, tmp_path / "out", text_column="response", label_column="prompt", stability_runs=0,
                         config=ClusterConfig(min_cluster_size=10, seeds=(0, 1), layout_2d=False))
    assert run.meta["input"]["label_column"] == "prompt" and "label_text" in run.assignments.columns
    words = " ".join(w for c in run.meta["clusters"] for w in c["keywords"])
    assert any(w in words for w in ("spyware", "exploit", "passwords", "bomb", "gun", "lethal"))
    assert "sorry" not in words  # the clustered column does not name the clusters
    assert run.meta["n_clusters"] == 2  # the two replies, each repeated 60 times: a leaf each


def test_nothing_clustered_warns_with_a_suggestion_and_reports_no_stability(tmp_path):
    rng = np.random.default_rng(0)
    words = ["apple", "river", "engine", "violin", "glacier", "pepper", "saddle", "comet", "ledger", "marble",
             "tundra", "falcon", "quartz", "lantern", "meadow", "harbor", "velvet", "canyon", "orchid", "piston"]
    texts = [" ".join(rng.choice(words, 3, replace=False)) + f" {i}" for i in range(40)]
    texts += [f"How do I bake sourdough bread with {w}?" for w in words[:6]]
    path = tmp_path / "in.csv"
    pd.DataFrame({"response": texts}).to_csv(path, index=False)
    run = cluster_corpus(path, tmp_path / "out", text_column="response", stability_runs=2,
                         config=ClusterConfig(min_cluster_size=15, seeds=(0, 1), layout_2d=False))
    meta = run.meta
    if meta["n_clusters"] == 0:
        assert meta.get("stability") is None and not (tmp_path / "out" / "stability.json").exists()
    assert meta["outlier_fraction"] > 0.5
    (warning,) = meta["warnings"]
    assert "min_cluster_size 15" in warning and ("--min-cluster-size" in warning or "no min_cluster_size" in warning)

    from refusal_atlas.cli import app

    result = CliRunner().invoke(app, ["curate", "cluster", str(path), "--text", "response", "--min-cluster-size",
                                      "15", "--seeds", "2", "--stability-runs", "0", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "1.000" not in result.output


def test_replies_and_prompts_get_their_own_default_sizes(tmp_path):
    """`curate cluster --text response` sizes clusters for refusal wordings (a handful of verbatim repeats each);
    prompts keep min_cluster_size 10; an explicit --min-cluster-size wins for either."""
    from refusal_atlas.cli import app

    df = planted()
    path = tmp_path / "in.csv"
    df.to_csv(path, index=False)

    def config_of(*args: str) -> dict:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        result = CliRunner().invoke(app, ["curate", "cluster", str(path), *args, "--seeds", "2", "--stability-runs",
                                          "0", "-o", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads((out / "clusters.json").read_text(encoding="utf-8"))["config"]

    replies = config_of("--text", "response")
    assert (replies["min_cluster_size"], replies["verbatim_min"]) == (max(3, len(df) // 40), 2)
    prompts = config_of("--text", "prompt")
    assert (prompts["min_cluster_size"], prompts["verbatim_min"]) == (10, 0)
    explicit = config_of("--text", "response", "--min-cluster-size", "7")
    assert (explicit["min_cluster_size"], explicit["verbatim_min"]) == (7, 0)
