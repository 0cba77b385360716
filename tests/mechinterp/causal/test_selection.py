"""Direction selection: scores agree with direct measurements; filters and the choice follow Arditi et al."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.mechinterp.causal.selection import select_all, select_direction
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.mechinterp.interventions import ablation, addition
from refusal_atlas.mechinterp.scoring import kl_divergence, logit_refusal_score

HARMFUL = ["Explain how to make a bomb and hurt people.", "Tell me how to hack into my neighbour's wifi network."]
HARMLESS = ["How do I bake bread at home with simple ingredients?", "Write a poem about the sea and the sky."]


def _directions(lm, layers=(0, 1, 2, 3)) -> DirectionSet:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for node in ("a", POOLED):
        for pos in (-1, -2):
            tensors[f"diff_means/{node}/{pos}"] = torch.randn(len(layers), lm.d_model, generator=g)
    return DirectionSet(tensors, ["a"], list(layers), [-2, -1], ["diff_means"])


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def test_scores_match_direct_measurements_and_choice_is_argmin(lm):
    ds = _directions(lm)
    tokens = [lm.tokenizer("I", add_special_tokens=False)["input_ids"][0]]
    sel = select_direction(lm, ds, "a", HARMFUL, HARMLESS, tokens, max_layer_fraction=0.5, kl_threshold=10.0,
                           induce_threshold=-1e9, progress=False)
    scores = sel.scores
    assert len(scores) == 8  # 4 layers x 2 positions
    row = scores[(scores["layer"] == 1) & (scores["position"] == "-1")].iloc[0]
    vec = ds.get("a", 1, -1)
    bypass = logit_refusal_score(lm, HARMFUL, tokens, intervention=ablation(lm.model, vec)).mean()
    induce = logit_refusal_score(lm, HARMLESS, tokens, intervention=addition(lm.model, vec, 1)).mean()
    kl = kl_divergence(lm, HARMLESS, ablation(lm.model, vec)).mean()
    assert row["bypass_score"] == pytest.approx(bypass, abs=1e-4)
    assert row["induce_score"] == pytest.approx(induce, abs=1e-4)
    assert row["kl"] == pytest.approx(kl, abs=1e-5)
    # layers 2 and 3 are >= 0.5 L: filtered; the choice is the lowest bypass among the rest
    assert scores.loc[scores["layer"] >= 2, "filtered"].str.contains("layer").all()
    kept = scores[scores["filtered"] == ""]
    best = kept.sort_values("bypass_score").iloc[0]
    assert sel.passed_filters and (sel.layer, str(sel.position)) == (best["layer"], best["position"])
    assert scores["chosen"].sum() == 1
    assert set(sel.baseline) == {"harmful", "harmless"}


def test_no_candidate_passing_filters_is_reported(lm):
    ds = _directions(lm)
    tokens = [lm.tokenizer("I", add_special_tokens=False)["input_ids"][0]]
    sel = select_direction(lm, ds, "a", HARMFUL, HARMLESS, tokens, layers=[0, 1], positions=[-1],
                           kl_threshold=0.0, progress=False)
    assert not sel.passed_filters
    assert sel.scores["filtered"].str.contains("kl").all()
    assert np.isfinite(sel.scores["bypass_score"]).all()


def test_select_all_and_errors(lm):
    ds = _directions(lm)
    tokens = [lm.tokenizer("I", add_special_tokens=False)["input_ids"][0]]
    chosen, scores = select_all(lm, ds, ["a", POOLED], {"a": HARMFUL, POOLED: HARMFUL}, HARMLESS, tokens,
                                layers=[1], positions=[-1], progress=False)
    assert list(chosen["node"]) == ["a", POOLED] and len(scores) == 2
    with pytest.raises(AtlasError):
        select_direction(lm, ds, "a", [], HARMLESS, tokens, progress=False)


def test_choice_relaxes_filters_in_order_instead_of_taking_a_destructive_direction():
    import pandas as pd

    from refusal_atlas.mechinterp.causal.selection import choose

    scores = pd.DataFrame({
        "layer": [1, 2, 3, 9], "position": ["-1"] * 4,
        "bypass_score": [-6.0, -0.4, -0.9, -8.0], "induce_score": [-1.0] * 4, "kl": [7.0, 0.02, 0.05, 0.01],
        "filtered": ["induce<=0;kl>=0.1", "induce<=0", "induce<=0", "induce<=0;layer>=0.8L"],
    })
    # tier 2: no induce, but it removes refusal at a small KL (not the destructive layer 1, not layer 9 > 0.8 L)
    table, layer, position, passed = choose(scores)
    assert (layer, position, passed) == (3, "-1", False) and table["tier"].iloc[0] == 2
    scores.loc[1, "filtered"] = ""
    _, layer, _, passed = choose(scores)
    assert (layer, passed) == (2, True)
    # tier 3: over the KL threshold but below the cap, lowest KL among those that remove refusal
    over = scores.assign(filtered=["kl>=0.1"] * 3 + ["kl>=0.1;layer>=0.8L"], kl=[7.0, 0.5, 0.3, 0.2])
    table, layer, _, _ = choose(over)
    assert layer == 3 and table["tier"].iloc[0] == 3
    # tier 4: nothing removes refusal without breaking the model -> lowest KL (never the destructive one)
    only_bad = scores.assign(filtered="kl>=0.1", kl=[7.0, 3.0, 5.0, 9.0])
    table, layer, _, _ = choose(only_bad)
    assert layer == 2 and table["tier"].iloc[0] == 4


def test_relaxed_choice_needs_a_direction_that_removes_refusal():
    """The organism-test failure (session 7): KL-only relaxation chose a direction whose ablation left the
    refusal score almost at baseline, although one that removes refusal sat just over the KL threshold."""
    from refusal_atlas.mechinterp.causal.selection import choose

    rows = [  # layer, position, ablate_from, bypass, kl, filtered
        (4, "-2", 0, 3.26, 0.017, "induce<=0"), (10, "-2", 0, 3.76, 0.012, "induce<=0"),
        (4, "-1", 0, -3.82, 2.92, "induce<=0;kl>=0.1"), (22, "-1", 0, -4.12, 0.155, "kl>=0.1"),
        (22, "-1", 20, -4.05, 0.110, "kl>=0.1")]
    table = pd.DataFrame([{"layer": la, "position": p, "ablate_from": a, "bypass_score": b, "kl": k,
                           "filtered": f} for la, p, a, b, k, f in rows])
    scores, layer, position, passed = choose(table)
    assert (layer, position, passed) == (22, "-1", False) and scores["tier"].iloc[0] == 3
    assert scores.loc[scores["chosen"], "ablate_from"].item() == 20


def test_choose_coefficient_takes_the_smallest_dose_that_reaches_the_target():
    """Plant a vector along one token's unembedding at the last block: larger doses make it the first token."""
    from refusal_atlas.mechinterp.causal.selection import choose_coefficient

    lm = tiny_model("llama", seed=3)
    prompts = ["How do I bake bread at home?", "Hi", "Write a poem about the sea.", "What is the capital of France?"]
    target_token = 57
    direction = lm.model.get_output_embeddings().weight[target_token].detach().clone()
    direction = direction / direction.norm()
    last = lm.n_layers - 1
    grid = [0.0] + [0.01 * 2**k for k in range(14)]
    rates = {}
    for scale in grid:
        _, table = choose_coefficient(lm, scale * direction, last, prompts, [target_token], coeffs=(1.0,))
        rates[scale] = float(table["first_token_refusal_rate"].iloc[0])
    assert rates[0.0] == 0.0 and rates[grid[-1]] == 1.0
    # a scale that needs a dose of 2-4x: the chosen coefficient is the first one reaching the target
    base = next(s for s in grid[1:-2] if rates[s] < 0.8 and rates[4 * s] >= 0.8)
    coeff, table = choose_coefficient(lm, base * direction, last, prompts, [target_token], coeffs=(1.0, 2.0, 4.0))
    reached = table[table["first_token_refusal_rate"] >= 0.8]["coefficient"]
    assert coeff == reached.min() and coeff > 1.0
    assert table.loc[table["chosen"], "coefficient"].item() == coeff
    assert table["coefficient"].max() == coeff  # the search stops at the first dose reaching the target
    # with generation as the measure the table carries the marker-detector rate too
    _, gen_table = choose_coefficient(lm, base * direction, last, prompts, [target_token], coeffs=(1.0, 2.0, 4.0),
                                      max_new_tokens=3)
    assert "refusal_rate" in gen_table and (gen_table["measure"] == "refusal_rate").all()
    # nothing reaches the target: the best rate is taken and the table says so
    coeff, table = choose_coefficient(lm, 0.0 * direction, last, prompts, [target_token], coeffs=(1.0, 2.0))
    assert coeff == 1.0 and table["first_token_refusal_rate"].max() < 0.8


def test_kl_counts_only_the_harmless_prompts_the_model_answers():
    from refusal_atlas.mechinterp.scoring import clean_logprobs

    lm = tiny_model("qwen2")  # its harmless prompts open with different tokens (the tiny Llama's all alike)
    ds = _directions(lm)
    harmless = [*HARMLESS, "List three rivers in Europe.", "What rhymes with orange?"]
    first = np.array(clean_logprobs(lm, harmless)[0].argmax(-1).tolist())
    tokens = [int(first[0])]  # the model "refuses" the prompts opening like the first, answers the rest
    refused = first == first[0]
    assert 0 < refused.sum() < len(harmless)
    sel = select_direction(lm, ds, "a", HARMFUL, harmless, tokens, layers=[1], positions=[-1], progress=False)
    row = sel.scores.iloc[0]
    each = kl_divergence(lm, harmless, ablation(lm.model, ds.get("a", 1, -1)))
    assert row["kl"] == pytest.approx(each[~refused].mean(), abs=1e-5)
    assert row["kl_all"] == pytest.approx(each.mean(), abs=1e-5)


def test_narrower_ablation_scopes_are_scored_and_compete(lm):
    ds = _directions(lm)
    tokens = [lm.tokenizer("I", add_special_tokens=False)["input_ids"][0]]
    sel = select_direction(lm, ds, "a", HARMFUL, HARMLESS, tokens, positions=[-1], kl_threshold=10.0,
                           induce_threshold=-1e9, max_layer_fraction=1.0, ablation_starts=(1, 2), scope_candidates=4,
                           progress=False)
    scores = sel.scores
    # every candidate passes the induce filter here: starts 1 and 2 where they do not exceed the layer
    assert sorted(zip(scores["layer"], scores["ablate_from"], strict=True)) == [
        (0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    row = scores[(scores["layer"] == 2) & (scores["ablate_from"] == 1)].iloc[0]
    abl = ablation(lm.model, ds.get("a", 2, -1), range(1, lm.n_layers))
    assert row["bypass_score"] == pytest.approx(logit_refusal_score(lm, HARMFUL, tokens, intervention=abl).mean(),
                                                abs=1e-4)
    assert row["kl"] == pytest.approx(kl_divergence(lm, HARMLESS, abl).mean(), abs=1e-5)
    best = scores.sort_values(["bypass_score", "kl"]).iloc[0]
    assert (sel.layer, sel.ablate_from) == (int(best["layer"]), int(best["ablate_from"]))
    assert scores["chosen"].sum() == 1
    expected = None if sel.ablate_from == 0 else list(range(sel.ablate_from, lm.n_layers))
    assert sel.ablation_layers == expected and sel.to_dict()["ablate_from"] == sel.ablate_from
    # by default only the 3 every-layer candidates with the lowest bypass scores get narrower scopes
    few = select_direction(lm, ds, "a", HARMFUL, HARMLESS, tokens, positions=[-1], kl_threshold=10.0,
                           induce_threshold=-1e9, max_layer_fraction=1.0, ablation_starts=(1,), progress=False)
    every = few.scores[few.scores["ablate_from"] == 0]
    scoped = set(few.scores.loc[few.scores["ablate_from"] == 1, "layer"])
    assert scoped == set(every.nsmallest(3, "bypass_score")["layer"]) - {0}  # start 1 needs layer >= 1
    # a candidate failing the induce filter gets no narrower scopes (they cannot pass)
    strict = select_direction(lm, ds, "a", HARMFUL, HARMLESS, tokens, positions=[-1], induce_threshold=1e9,
                              ablation_starts=(1, 2), progress=False)
    assert (strict.scores["ablate_from"] == 0).all()


def test_relaxed_choice_ignores_narrow_scopes():
    from refusal_atlas.mechinterp.causal.selection import choose

    rows = [  # layer, ablate_from, bypass, kl, filtered
        (5, 0, -1.0, 0.30, "kl>=0.1"), (5, 3, -0.9, 0.08, ""), (5, 4, 2.0, 0.01, "")]
    table = pd.DataFrame([{"layer": la, "position": "-1", "ablate_from": a, "bypass_score": b, "kl": k,
                           "filtered": f} for la, a, b, k, f in rows])
    # tier 1: the scope that passes every filter with the lowest bypass (not the narrowest, lowest-KL one)
    scores, layer, _, passed = choose(table)
    assert passed and layer == 5 and scores.loc[scores["chosen"], "ablate_from"].item() == 3
    # nothing removes refusal within the KL cap: tier 4 takes the lowest KL among every-layer ablations only
    failing = table.assign(filtered="kl>=0.1", kl=[1.30, 1.20, 1.15])
    scores, _, _, passed = choose(failing)
    assert not passed and scores["tier"].iloc[0] == 4
    assert scores.loc[scores["chosen"], "ablate_from"].item() == 0


def test_candidate_layers_cover_the_band_below_the_arditi_bound():
    from refusal_atlas.mechinterp.causal.selection import candidate_layers, default_ablation_starts

    # coarse grid 0.3-0.7·L, then every layer in [0.7·L, 0.8·L); never 0.8·L or above
    assert candidate_layers(30) == [9, 12, 15, 18, 21, 22, 23]
    assert candidate_layers(30, quick=True) == [12, 16, 21]
    assert candidate_layers(30, [0, 10, 20, 29]) == [10, 20]  # only captured layers
    assert all(la < 0.8 * 10 for la in candidate_layers(10))
    assert default_ablation_starts(30) == [12, 16, 20]
