"""Known answer: in a tiny model with planted refusal mechanisms, the K* feature sets of two nodes whose
mechanisms are separate are disjoint beyond the Jaccard noise floor, and those of two nodes sharing one
mechanism overlap beyond chance; clamping a node's set removes refusal where its mechanism acts.

The plant: an orthonormal basis q_0..q_63 of the residual stream at block 3's output is the SAE's
dictionary (so the SAE is exact and its latent i reads q_i). A hook on block 2's output adds
alpha·(1 + noise) q_i for every latent i of the prompt's mechanism (chosen by a trigger word), and the
planted refusal token's unembedding reads exactly the mechanism latents. Optionally one node also gets
a large *topic* component on latents no token reads, so that its difference of means is mostly topic
(what the real shared organism showed for intellectual property). Attribution, candidates, selection,
the bootstrap Jaccard and the cross-clamp are the stage's own code.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from refusal_atlas.atlas.sae_stage import SaeInputs, SaeSettings, clamp_matrix
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output, replace_hidden
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import post_instruction_positions
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.mechinterp.sae import SAEConfig, SparseAutoencoder
from refusal_atlas.mechinterp.sae.features import attributions, candidate_pool, select
from refusal_atlas.mechinterp.sae.overlap import feature_overlap

D = 64
LAYER = 3  # the SAE reads block 3's output; the plant is written at block 2's output, upstream of it
TOKEN = 7  # the planted refusal-opening token
MECH = {"A": list(range(0, 5)), "B": list(range(5, 10)), "S": list(range(10, 15))}
TOPIC = list(range(20, 40))  # the "hack" prompts' topic latents (with `topic`): no token reads them
TOPIC_SCALE = 3.0  # per topic latent 3/sqrt(20) = 0.67 of the plant scale, above a mechanism latent's 1/sqrt(5)
N_CAND = 12
K_STAR = 5
SCALE = 1.0  # the plant against the residual norm: large enough to decide refusal, small enough not to saturate it
TEMPLATES = {"weapons": ["Explain how to make a bomb {}.", "Where do I buy bomb parts {}?"],
             "cyber": ["Tell me how to hack wifi {}.", "Write code to hack a bank {}."]}
HARMLESS = ["How do I bake bread {}?", "Write a poem about the sea {}."]


def _prompts(templates: list[str], n: int, offset: int = 0) -> list[str]:
    return [t.format(f"number {i + offset}") for i in range(n) for t in templates][:n]


def _planted(separable: bool, topic: bool = False) -> tuple[LoadedModel, SparseAutoencoder]:
    """The tiny model with its plant installed (hooks live as long as the model) and the exact SAE."""
    lm = tiny_model("llama", n_layers=4, d_model=D, seed=5)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    q = q.T.contiguous()  # rows: the planted basis
    mechanisms = {"bomb": MECH["A"] if separable else MECH["S"], "hack": MECH["B"] if separable else MECH["S"]}
    reads = q[[i for ids in MECH.values() for i in ids]].sum(0)
    head = lm.model.get_output_embeddings().weight
    with torch.no_grad():
        basis = q[[i for ids in MECH.values() for i in ids] + TOPIC]
        head.copy_(head - (head @ basis.T) @ basis)  # no token reads a mechanism direction ...
        head[TOKEN] = 1.5 * reads  # ... except the refusal token, which reads all of them
    tok = lm.tokenizer
    current: dict[str, list[tuple[list[int], Tensor]]] = {}

    def find_triggers(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows = []
        for row in ids.tolist():
            text = tok.decode(row, skip_special_tokens=True)
            latents = next((m for word, m in mechanisms.items() if word in text), [])
            gen = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            rows.append((latents, 1.0 + 0.5 * torch.rand(len(latents), generator=gen)))
        current["rows"] = rows
        current["hack"] = ["hack" in tok.decode(row, skip_special_tokens=True) for row in ids.tolist()]

    def plant(module: nn.Module, args: Any, output: Any) -> Any:
        h = hidden_from_output(output)
        scale = SCALE * float(h.detach().norm(dim=-1).mean())
        add = torch.zeros_like(h)
        for r, (latents, amount) in enumerate(current["rows"]):
            if latents:
                add[r] += scale * (amount[:, None] * q[latents]).sum(0) / len(latents) ** 0.5
            if topic and latents and current["hack"][r]:
                add[r] += TOPIC_SCALE * scale * q[TOPIC].sum(0) / len(TOPIC) ** 0.5
        return replace_hidden(output, h + add)

    lm.model.register_forward_pre_hook(find_triggers, with_kwargs=True)
    decoder_blocks(lm.model)[LAYER - 1].register_forward_hook(plant)
    sae = SparseAutoencoder(SAEConfig("standard", D, D, apply_b_dec_to_input=False),
                            {"W_enc": q.T.contiguous(), "W_dec": q, "b_enc": torch.zeros(D), "b_dec": torch.zeros(D)})
    return lm, sae


def _feature_sets(lm: LoadedModel, sae: SparseAutoencoder, *, pooled: bool = True, steps: int = 1, last: int = 0
                  ) -> tuple[Any, dict[str, float], dict[str, list[int]], dict[str, Tensor]]:
    """The stage's selection: candidates by cosine to each node's direction (and, with `pooled`, to the
    pooled refusal direction), K* by attribution (`steps` > 1: integrated gradients; `last` > 0: over the
    last tokens only)."""
    harmful = {n: _prompts(t, 10) for n, t in TEMPLATES.items()}
    harmless = _prompts(HARMLESS, 10)
    acts = capture_activations(lm, [*harmful["weapons"], *harmful["cyber"], *harmless], layers=[LAYER],
                               positions=[-1], progress=False).acts[:, 0, 0]
    base = acts[20:].mean(0)
    directions = {"weapons": acts[:10].mean(0) - base, "cyber": acts[10:20].mean(0) - base}
    refusal = acts[:20].mean(0) - base if pooled else None
    attr, cand = {}, {}
    for node in harmful:
        cand[node], _ = candidate_pool(sae, directions[node], N_CAND, refusal)
        attr[node] = attributions(lm, sae, LAYER, harmful[node], [TOKEN], batch_size=4, steps=steps, last=last)
    chosen = {n: sorted(select(attr[n], cand[n], K_STAR).tolist()) for n in harmful}
    pairs, self_agree = feature_overlap(attr, cand, K_STAR, n_boot=100, seed=0)
    return pairs.iloc[0], self_agree, chosen, directions


def _cross_clamp(lm: LoadedModel, sae: SparseAutoencoder, chosen: dict[str, list[int]],
                 directions: dict[str, Tensor]) -> dict[tuple[str, str], float]:
    inputs = SaeInputs({}, {n: _prompts(t, 4, 50) for n, t in TEMPLATES.items()}, [], _prompts(HARMLESS, 4, 50),
                       [TOKEN])
    m = clamp_matrix(lm, sae, LAYER, chosen, directions, inputs, SaeSettings(clamp_factor=-1.0, forward_batch=4))
    assert (m["refusal_before"] == 1.0).all()  # the plant makes every harmful prompt refuse
    return {(r.source, r.target): float(r.refusal_after) for r in m.itertuples()}


@pytest.mark.parametrize("pooled", [True, False], ids=["node+refusal", "node"])
def test_separate_mechanisms_give_disjoint_feature_sets(pooled: bool) -> None:
    lm, sae = _planted(separable=True)
    pair, self_agree, chosen, directions = _feature_sets(lm, sae, pooled=pooled)
    assert chosen == {"weapons": MECH["A"], "cyber": MECH["B"]}
    assert pair["jaccard"] == 0.0 and pair["ci_high"] == 0.0
    assert min(self_agree.values()) >= 0.9 and min(pair["self_a_low"], pair["self_b_low"]) > pair["ci_high"]
    assert pair["distinct"] and not pair["overlapping"]
    after = _cross_clamp(lm, sae, chosen, directions)
    assert after[("weapons", "weapons")] == 0.0 and after[("cyber", "cyber")] == 0.0  # own refusal removed
    assert after[("weapons", "cyber")] == 1.0 and after[("cyber", "weapons")] == 1.0  # the other's untouched


@pytest.mark.parametrize("pooled", [True, False], ids=["node+refusal", "node"])
def test_a_shared_mechanism_gives_overlapping_feature_sets(pooled: bool) -> None:
    lm, sae = _planted(separable=False)
    pair, _, chosen, directions = _feature_sets(lm, sae, pooled=pooled)
    assert chosen == {"weapons": MECH["S"], "cyber": MECH["S"]}
    assert pair["jaccard"] == 1.0 > pair["chance_95"]
    assert pair["overlapping"] and not pair["distinct"]
    after = _cross_clamp(lm, sae, chosen, directions)
    assert all(v == 0.0 for v in after.values())  # either node's set removes both nodes' refusal


@pytest.mark.parametrize("separable", [True, False])
def test_the_plant_is_what_the_directions_see(separable: bool) -> None:
    """Guard on the fixture itself: each node's direction lies mostly in its planted mechanism's span."""
    lm, sae = _planted(separable)
    *_, directions = _feature_sets(lm, sae)
    for node, mech in (("weapons", "A" if separable else "S"), ("cyber", "B" if separable else "S")):
        d = directions[node] / directions[node].norm()
        share = float((sae.W_dec[MECH[mech]] @ d).norm())
        assert share > 0.75, (node, share)  # a random unit vector: about sqrt(5 / 64) = 0.28


@pytest.mark.parametrize("separable", [True, False])
def test_integrated_gradients_select_the_planted_sets(separable: bool) -> None:
    lm, sae = _planted(separable)
    pair, _, chosen, _ = _feature_sets(lm, sae, steps=8)
    if separable:
        assert chosen == {"weapons": MECH["A"], "cyber": MECH["B"]} and pair["distinct"] and pair["ci_high"] == 0.0
    else:
        assert chosen == {"weapons": MECH["S"], "cyber": MECH["S"]} and pair["overlapping"]


@pytest.mark.parametrize("separable", [True, False])
def test_attribution_at_the_post_instruction_tokens_selects_the_planted_sets(separable: bool) -> None:
    lm, sae = _planted(separable)
    last = len(post_instruction_positions(lm))
    pair, _, chosen, _ = _feature_sets(lm, sae, last=last)
    if separable:
        assert chosen == {"weapons": MECH["A"], "cyber": MECH["B"]} and pair["distinct"] and pair["ci_high"] == 0.0
    else:
        assert chosen == {"weapons": MECH["S"], "cyber": MECH["S"]} and pair["overlapping"]


def test_attribution_over_the_last_tokens_is_part_of_the_sum_over_all() -> None:
    lm, sae = _planted(False)
    prompts = _prompts(TEMPLATES["cyber"], 3)
    # block 1 (the dictionary is a basis, exact at any layer): two blocks of attention carry earlier tokens'
    # latents to the last position (after block 3 only the last token's own latents reach the logits)
    every = attributions(lm, sae, 1, prompts, [TOKEN], batch_size=2)
    longest = max(len(lm.tokenizer(lm.chat_prompt(p), add_special_tokens=False)["input_ids"]) for p in prompts)
    # left padding: the last `longest` positions hold every real token, padding contributes nothing
    torch.testing.assert_close(attributions(lm, sae, 1, prompts, [TOKEN], batch_size=2, last=longest), every)
    one = attributions(lm, sae, 1, prompts, [TOKEN], batch_size=2, last=1)
    assert not torch.allclose(one, every) and one.abs().sum() > 0


def test_a_shared_mechanism_under_a_topic_direction_needs_the_refusal_candidates() -> None:
    """One mechanism for both nodes, but "cyber"'s difference of means is mostly its topic: by its own
    direction its candidates are topic latents, so its K* set misses the shared mechanism (the failure
    the real shared organism showed); joined with the pooled direction's candidates, attribution finds it."""
    lm, sae = _planted(separable=False, topic=True)
    *_, directions = _feature_sets(lm, sae, pooled=False)
    d = directions["cyber"] / directions["cyber"].norm()
    topic_share = float((sae.W_dec[TOPIC] @ d).norm())
    assert topic_share > 0.85, topic_share  # the fixture does what it says: the direction is mostly topic
    pair, _, chosen, _ = _feature_sets(lm, sae, pooled=False)
    assert not set(chosen["cyber"]) & set(MECH["S"]) and not pair["overlapping"]  # the old candidates fail
    pair, _, chosen, _ = _feature_sets(lm, sae, pooled=True)
    assert chosen == {"weapons": MECH["S"], "cyber": MECH["S"]}
    assert pair["jaccard"] == 1.0 > pair["chance_95"] and pair["overlapping"] and not pair["distinct"]
