"""Class 1 of the reliability contract: no input is lost without an error."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli.helpers import one_line_error, run_main
from refusal_atlas.curation.cluster import ClusterConfig, ClusterPipeline
from refusal_atlas.curation.tables import read_table
from refusal_atlas.taxonomy import edit
from refusal_atlas.taxonomy.loader import load_taxonomy

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"


def _propose_after_barrier(root: str, node_id: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()  # every process reads the taxonomy at the same moment: the worst case for lost updates
    edit.propose(root, node_id, "health", f"Label {node_id}", "A definition.")


def test_concurrent_proposals_all_survive(tdir):
    ctx = multiprocessing.get_context("fork")
    ids = [f"health.concurrent_{i}" for i in range(4)]
    barrier = ctx.Barrier(len(ids))
    procs = [ctx.Process(target=_propose_after_barrier, args=(str(tdir), i, barrier)) for i in ids]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(ids)
    taxonomy = load_taxonomy(tdir)
    assert set(ids) <= set(taxonomy.nodes), sorted(set(ids) - set(taxonomy.nodes))
    assert not list(tdir.glob(".*")), "the lock file lives beside the taxonomy, not in it"


def test_csv_lines_starting_with_hash_are_data(monkeypatch, capsys, tmp_path):
    src = tmp_path / "h.csv"
    src.write_text('prompt,response\n#MeToo explained,"Sure"\nhi,"A\n# Step 1\nB"\n', encoding="utf-8")
    out = tmp_path / "h.jsonl"
    code, _, err = run_main(monkeypatch, capsys, "curate", "detect", str(src), "-o", str(out), "--detector", "marker")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["#MeToo explained", "hi"]
    assert rows[1]["response"] == "A\n# Step 1\nB"


def test_leading_comment_lines_before_the_header_are_skipped(tmp_path):
    src = tmp_path / "c.csv"
    src.write_text("# dataset_version=1.2\n# second comment\nprompt,note\n# not a comment,x\n", encoding="utf-8")
    df = read_table(src)
    assert list(df.columns) == ["prompt", "note"] and df["prompt"].tolist() == ["# not a comment"]


def test_pyrit_refusal_set_loads_through_the_registry_with_markdown_cells():
    from refusal_atlas.curation.detect import pyrit_refusal_labels

    try:
        path = pyrit_refusal_labels()
    except Exception as exc:  # the data package is optional
        pytest.skip(f"pyrit data not installed: {exc}")
    df = read_table(path)
    assert {"objective", "assistant_response", "human_score"} <= set(df.columns)
    expected = pd.read_csv(path, skiprows=1, dtype=str, keep_default_na=False)  # no comment stripping
    assert len(df) == len(expected)
    assert df["assistant_response"].str.contains("\n###", regex=False).any()


def test_output_equal_to_the_input_is_refused(monkeypatch, capsys, tmp_path):
    src = tmp_path / "r.csv"
    src.write_text("prompt,response\na,I can't help with that.\nb,\n", encoding="utf-8")
    before = src.read_bytes()
    line = one_line_error(monkeypatch, capsys, "curate", "detect", str(src), "-o", str(src), "--detector", "marker")
    assert "output is the input" in line
    assert src.read_bytes() == before


def test_collect_output_equal_to_prompts_is_one_line(monkeypatch, capsys, tmp_path):
    src = tmp_path / "p.csv"
    src.write_text("prompt\nhello\n", encoding="utf-8")
    line = one_line_error(monkeypatch, capsys, "curate", "collect", "-p", str(src), "-o", str(src),
                          "--model", str(tmp_path / "no-model"))
    assert "output is the input" in line and src.read_text() == "prompt\nhello\n"


def test_rejects_file_holds_the_rejected_row(monkeypatch, capsys, tmp_path):
    src = tmp_path / "r.csv"
    src.write_text('prompt,response\nkeep me,"Sure, here it is."\nlost?,"one","two"\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    code, _, err = run_main(monkeypatch, capsys, "curate", "detect", str(src), "-o", str(out), "--detector", "marker")
    assert code == 0, err
    rejects = [json.loads(line) for line in (tmp_path / "o.jsonl.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["row"] == 2
    assert rejects[0]["record"] == ["lost?", "one", "two"]


def test_non_text_cell_reject_keeps_the_row(monkeypatch, capsys, tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text('{"prompt": "p1", "response": "Sure."}\n{"prompt": "p2", "response": 7}\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    code, _, err = run_main(monkeypatch, capsys, "curate", "detect", str(src), "-o", str(out), "--detector", "marker")
    assert code == 0, err
    (reject,) = [json.loads(line) for line in (tmp_path / "o.jsonl.rejects.jsonl").read_text().splitlines()]
    assert reject["record"] == {"prompt": "p2", "response": 7}


def test_non_text_cells_are_rejects_in_clustering_not_their_repr(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("REFUSAL_ATLAS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "r.jsonl"
    lines = [{"prompt": f"How do I bake loaf number {i}?"} for i in range(4)]
    lines[1], lines[2] = {"prompt": ["a", "b"]}, {"prompt": 7}
    src.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, "curate", "cluster", str(src), "-o", str(tmp_path / "c"),
                            "--text", "prompt", "--stability-runs", "0")
    assert code == 0, err
    rejects = [json.loads(line) for line in (tmp_path / "c" / "assignments.parquet.rejects.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert [(r["row"], r["reason"], r["record"]) for r in rejects] == [
        (2, "prompt is not text (list)", {"prompt": ["a", "b"]}), (3, "prompt is not text (int)", {"prompt": 7})]
    assert pd.read_parquet(tmp_path / "c" / "assignments.parquet")["row"].tolist() == [0, 3]


def test_repeated_texts_keep_their_counts_in_clustering():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 32))
    x = np.vstack([np.repeat(a[None], 60, 0), np.repeat(b[None], 60, 0)])
    texts = ["I cannot help with that."] * 60 + ["The capital of France is Paris."] * 60
    result = ClusterPipeline(ClusterConfig(seeds=(0, 1))).fit(x, texts)
    assert result.n_clusters == 2 and result.outlier_fraction == 0.0
    assert len(set(result.labels[:60])) == 1 and result.labels[0] != result.labels[60]


def test_repeats_below_the_minimum_cluster_size_stay_outliers():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 32))
    x = np.vstack([np.repeat(a[None], 3, 0), np.repeat(b[None], 3, 0)])
    result = ClusterPipeline(ClusterConfig(seeds=(0,), min_cluster_size=10)).fit(x, ["a"] * 3 + ["b"] * 3)
    assert result.n_clusters == 0
