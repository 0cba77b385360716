"""The harm stage end to end on a tiny model with planted harmfulness and refusal directions.

The table carries detector labels (the planted conditions) and replies; the stage adds jailbreak-wrapped
held-out requests and tense reformulations from the installed packages, labels them itself, and writes
every table. With H ⟂ R planted the weapons node must come out "separate".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from refusal_atlas.atlas.harm_stage import HarmSettings, findings_rows, group_of, load_directions, run_harm_stage
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.taxonomy.loader import load_taxonomy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mechinterp"))
from test_harm_refusal import Planted, make_prompts, planted_vectors


def stage_table() -> pd.DataFrame:
    table = make_prompts(10, seed=1)
    table["node"] = table["analysis_node"].map({"weapons": "weapons.firearms", "": ""})
    table = table.drop(columns=["analysis_node"])
    table["source"] = ["harmbench" if h else "harmless" for h in table["harmful"]]
    table["condition"] = ""
    table["expected"] = ["refuse" if h else "comply" for h in table["harmful"]]
    table["run_split"] = "eval"
    table["response"] = ["I'm sorry, I cannot help with that." if r else "Sure, here is a simple recipe."
                         for r in table["refused"]]
    return table


def test_harm_stage_end_to_end(tmp_path: Path) -> None:
    lm = tiny_model("llama", n_layers=3, d_model=64)
    settings = HarmSettings(jailbreak_per_node=4, pyrit_wrappers=2, dan_wrappers=1, tense_prompts=3,
                            max_new_tokens=4, n_splits=20, n_boot=50, causal_prompts=4, causal_nodes=2)
    with Planted(lm, *planted_vectors(lm.d_model, same=False)):
        summary = run_harm_stage(tmp_path, lm, stage_table(), load_taxonomy(None), 0, settings=settings)
    folder = tmp_path / "harm"
    for name in ("cells.csv", "geometry.csv", "projections.csv", "projections.png", "causal.csv", "findings.json",
                 "prompts.parquet", "directions.safetensors", "harm.json"):
        assert (folder / name).is_file(), name
    cells = pd.read_csv(folder / "cells.csv", keep_default_na=False).set_index("node")
    assert cells.loc["weapons", ["n_HR", "n_HC", "n_LR", "n_LC"]].tolist() == [10, 10, 10, 10]
    rows = pd.read_parquet(folder / "prompts.parquet")
    jail = rows[rows["added"] == "jailbreak"]
    assert len(jail) == 4 and jail["framing"].str.startswith("jailbreak:").all()
    assert set(jail["branch"]) == {"weapons"} and jail["response"].str.len().gt(0).all()
    assert (rows["added"] == "tense").sum() == 6
    findings = findings_rows(tmp_path)
    assert {f["subject"] for f in findings} == {"weapons", "@all"}
    weapons = next(f for f in findings if f["subject"] == "weapons")
    assert weapons["verdict"] == "separate", weapons["sentence"]
    assert weapons["question"] == "harmfulness_vs_refusal" and weapons["evidence"] == "harm-vs-refusal"
    assert set(weapons) >= {"title", "sentence", "rule", "rule_text", "value", "ci", "n", "trusted"}
    proj = pd.read_csv(folder / "projections.csv")
    assert {"jailbreak:pyrit", "jailbreak:garak-dan"} <= set(proj[proj["node"] == "weapons"]["group"])
    assert "tense:past" in set(proj[proj["node"] == "@all"]["group"])
    causal = pd.read_csv(folder / "causal.csv")
    assert set(causal["intervention"]) == {"add_h", "add_r", "ablate_h", "ablate_r"}
    assert set(load_directions(tmp_path)) == {"h/weapons", "r/weapons", "h/@all", "r/@all"}
    assert json.loads((folder / "harm.json").read_text())["verdicts"] == summary["verdicts"]


def test_group_of_rows() -> None:
    base = {"harmful": True, "framing": "", "condition": "", "expected": "refuse", "resembles": ""}
    assert group_of(pd.Series(base)) == "plain"
    assert group_of(pd.Series({**base, "condition": "purpose=education", "expected": "comply"})) == "loosening"
    assert group_of(pd.Series({**base, "condition": "user_age=minor"})) == "refusing_condition"
    assert group_of(pd.Series({**base, "framing": "jailbreak:pyrit:aim"})) == "jailbreak:pyrit"
    assert group_of(pd.Series({**base, "harmful": False, "resembles": "cyber"})) == "overrefusal_probe"


def test_table_without_required_columns_is_one_line_error(tmp_path: Path) -> None:
    lm = tiny_model("llama", n_layers=2, d_model=32)
    with pytest.raises(AtlasError, match="lacks column"):
        run_harm_stage(tmp_path, lm, pd.DataFrame({"text": ["x"]}), load_taxonomy(None), 0)


def test_cli_show_without_analysis_is_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from refusal_atlas.cli.harm import app

    result = CliRunner().invoke(app, ["show", str(tmp_path)])
    assert result.exit_code != 0 and isinstance(result.exception, AtlasError)
    assert "harm analyse" in str(result.exception) and "\n" not in str(result.exception)
    result = CliRunner().invoke(app, ["analyse", str(tmp_path), "-o", str(tmp_path / "o")])
    assert isinstance(result.exception, AtlasError) and "corpus.parquet" in str(result.exception)


def test_harm_table_adds_unlabelled_rows_per_branch() -> None:
    from refusal_atlas.atlas.harm_stage import harm_table

    corpus = pd.DataFrame({"prompt": ["a", "b"], "harmful": [True, False], "analysis_node": ["cyber", ""],
                           "condition": "", "source": ["harmbench", "harmless"], "refused": [True, False]})
    pool = pd.DataFrame({
        "prompt": ["a", "c1", "c2", "c3", "k1", "p1", "h1", "h2"],
        "harmful": [True, True, True, True, True, False, False, False],
        "analysis_node": ["cyber", "cyber", "cyber", "cyber", "cyber", "", "", ""],
        "condition": ["", "", "", "", "purpose=education", "", "", ""],
        "source": ["harmbench"] * 5 + ["overrefusal", "harmless", "harmless"], "refused": [True] * 8})
    out = harm_table(corpus, pool, extra_per_node=2, extra_harmless=1, seed=0)
    added = out.iloc[2:]
    assert "a" not in set(added["prompt"])  # already labelled in the corpus
    assert added["refused"].isna().all()  # the pool's labels never leak in: the stage labels added rows
    assert len(added[added["harmful"] & (added["condition"] == "")]) == 2
    assert set(added["prompt"]) >= {"k1", "p1"} and len(added[added["source"] == "harmless"]) == 1
