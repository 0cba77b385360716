"""The band scan: removing a window of blocks' writes along a direction, on real tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.mechinterp.causal.bands import band_scan, block_windows, scan_layer, write_ablation
from refusal_atlas.mechinterp.causal.files import BANDS, write_table
from refusal_atlas.mechinterp.directions import compute_directions

PROMPTS = ["How do I make a bomb at home?", "Hack the wifi for me.", "Write a poem about the sea.",
           "What is the capital of France?"]


def test_windows_tile_the_blocks_without_overlap():
    assert block_windows(30) == [(lo, lo + 2) for lo in range(0, 30, 3)]
    assert block_windows(4, 10) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    wins = block_windows(7, 3)
    assert wins == [(0, 2), (3, 5), (6, 6)]
    with pytest.raises(AtlasError):
        block_windows(0)
    assert scan_layer(30, range(30)) == 28 and scan_layer(30, [4, 12, 29]) == 12


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_removing_every_write_up_to_a_layer_leaves_only_the_embeddings_along_the_direction(arch):
    """The residual after block k is the embedding plus blocks 0..k's writes: with those writes' component along
    r removed, the stream's projection on r is the embedding's, whatever the blocks computed."""
    lm = tiny_model(arch, n_layers=4)
    torch.manual_seed(0)
    r = torch.randn(lm.model.config.hidden_size)
    clean = capture_activations(lm, PROMPTS, layers=[-1, 1], positions=[-1], progress=False)
    with write_ablation(lm.model, r, range(0, 2)):
        cut = capture_activations(lm, PROMPTS, layers=[1, 3], positions=[-1], progress=False)
    with write_ablation(lm.model, r, range(0, 4)):
        cut_all = capture_activations(lm, PROMPTS, layers=[1, 3], positions=[-1], progress=False)
    u = r / r.norm()
    # blocks 0..1 wrote nothing along r, so layers 1 and 3 (blocks 2, 3 kept) differ; with every write removed the
    # projection is the same at layer 1 and layer 3 (only the embedding, which no block overwrote)
    assert torch.allclose(cut_all.at(1, -1) @ u, cut_all.at(3, -1) @ u, atol=1e-4)
    assert torch.allclose(cut.at(1, -1) @ u, cut_all.at(1, -1) @ u, atol=1e-4)
    assert not torch.allclose(clean.at(1, -1) @ u, cut.at(1, -1) @ u, atol=1e-3)
    # the hooks are gone afterwards
    again = capture_activations(lm, PROMPTS, layers=[1], positions=[-1], progress=False)
    assert torch.allclose(again.at(1, -1), clean.at(1, -1), atol=1e-5)


def test_a_block_outside_the_model_is_a_one_line_error():
    lm = tiny_model("llama", n_layers=3)
    with pytest.raises(AtlasError, match=r"out of range.*0\.\.2"):
        write_ablation(lm.model, torch.ones(lm.model.config.hidden_size), [1, 3])


def test_band_scan_table(tmp_path):
    lm = tiny_model("llama", n_layers=4)
    acts = capture_activations(lm, PROMPTS * 2, layers=None, positions=[-1], progress=False)
    ds = compute_directions(acts, ["a", "b", "", ""] * 2, [True, True, False, False] * 2)
    tokens = [lm.tokenizer("I", add_special_tokens=False)["input_ids"][0]]
    table = band_scan(lm, ds, {"a": PROMPTS[:2], "b": PROMPTS[1:2], "missing": []}, tokens, position=-1,
                      n_windows=2, settings=RunSettings(progress=False))
    assert list(table["node"].unique()) == ["a", "b"]
    assert list(table["kind"]) == ["window", "window", "all"] * 2
    assert list(zip(table["block_lo"], table["block_hi"], strict=True))[:3] == [(0, 1), (2, 3), (0, 3)]
    assert (table["scan_layer"] == 2).all() and table["n"].tolist() == [2, 2, 2, 1, 1, 1]
    assert table["first_token_refusal_rate"].between(0, 1).all()
    # one baseline per node, and every removal moves the score (the direction is never orthogonal to the writes)
    assert table.groupby("node")["logit_score_baseline"].nunique().eq(1).all()
    assert not np.allclose(table["logit_score"], table["logit_score_baseline"])
    assert write_table(table, tmp_path, BANDS).is_file()
    # a baseline measured elsewhere on the same prompts is used as given, and the measured one matches it
    given = band_scan(lm, ds, {"a": PROMPTS[:2]}, tokens, position=-1, n_windows=2,
                      settings=RunSettings(progress=False), baselines={"a": (0.5, 1.25, [1.0, 1.5])})
    assert (given["first_token_refusal_rate_baseline"] == 0.5).all() and (given["logit_score_baseline"] == 1.25).all()
    assert all(list(v) == [1.0, 1.5] for v in given["prompt_logit_scores_baseline"])
    # per-prompt scores in prompt order: their mean is the row's mean
    assert np.allclose([np.mean(v) for v in table["prompt_logit_scores"]], table["logit_score"])
    assert np.allclose(given["logit_score"], table.loc[table["node"] == "a", "logit_score"])
