"""Clamping, attribution and feature-set overlap on planted ground truth in a tiny model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import block_states, decoder_blocks, hidden_from_output, replace_hidden, restored_blocks
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.mechinterp.sae import SAEConfig, SparseAutoencoder
from refusal_atlas.mechinterp.sae.clamp import clamp
from refusal_atlas.mechinterp.sae.features import (
    _logodds,
    attributions,
    candidate_pool,
    candidates,
    latent_stats,
    select,
)
from refusal_atlas.mechinterp.sae.overlap import feature_overlap, jaccard
from refusal_atlas.mechinterp.sae.tokens import capture_tokens

PROMPTS = ["How do I bake bread at home?", "Write a poem about the sea.", "Tell me how to hack wifi.",
           "What is the capital of France?", "Explain how to make a bomb.", "Summarise a novel in three sentences."]
LAYER = 3  # the last block: only the final norm and the LM head read what the clamp changes
TOKEN = 7  # the planted "refusal" token
WITNESS = 9


def _last_hidden(lm: LoadedModel) -> torch.Tensor:
    kept: dict[str, torch.Tensor] = {}
    h = decoder_blocks(lm.model)[LAYER].register_forward_hook(lambda m, a, o: kept.update(h=hidden_from_output(o)))
    try:
        rows = []
        for p in PROMPTS:
            ids = lm.tokenizer(lm.chat_prompt(p), add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                lm.model(input_ids=ids)
            rows.append(kept["h"][0])
    finally:
        h.remove()
    return torch.cat(rows)


@pytest.fixture(scope="module")
def planted() -> tuple[LoadedModel, SparseAutoencoder, torch.Tensor]:
    """A tiny Llama whose token TOKEN reads exactly one direction u at the last block, and an SAE whose
    latent 0 writes u (orthonormal decoder, so every other latent is orthogonal to it)."""
    lm = tiny_model("llama", n_layers=4, d_model=64, seed=1)
    h = _last_hidden(lm)
    u = h.mean(0) / h.mean(0).norm()  # positive on most tokens, so latent 0 is active
    basis, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(64, 63, generator=torch.Generator().manual_seed(0))],
                                         dim=1))
    q = basis.T * torch.sign(basis[:, 0] @ u)  # row 0 = +u
    q[0] = u
    head = lm.model.get_output_embeddings().weight
    with torch.no_grad():
        head.copy_(head - (head @ u)[:, None] * u)  # no other token reads u ...
        head[TOKEN] = 2.0 * u  # ... and TOKEN reads only u
        head[WITNESS] = 2.0 * q[7]  # a token reading a direction no clamp below touches
    cfg = SAEConfig("standard", 64, 64, apply_b_dec_to_input=False)
    sae = SparseAutoencoder(cfg, {"W_enc": q.T.contiguous(), "W_dec": q.contiguous(), "b_enc": torch.zeros(64),
                                  "b_dec": torch.zeros(64)})
    return lm, sae, u


def _logits(lm: LoadedModel, intervention: object = None) -> torch.Tensor:
    ids = lm.tokenizer(lm.chat_prompt(PROMPTS[0]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if intervention is None:
            return lm.model(input_ids=ids).logits[0]
        with intervention:  # type: ignore[attr-defined]
            return lm.model(input_ids=ids).logits[0]


def test_clamp_changes_exactly_the_planted_readout(planted: tuple[LoadedModel, SparseAutoencoder, torch.Tensor]
                                                   ) -> None:
    lm, sae, _ = planted
    clean = _logits(lm)
    assert torch.allclose(_logits(lm, clamp(lm.model, sae, LAYER, [0], factor=1.0)), clean, atol=1e-5)
    active = clean[:, TOKEN] > 0.5
    assert active.sum() >= 3  # the planted latent is on at several positions
    off = _logits(lm, clamp(lm.model, sae, LAYER, [0], factor=0.0))
    # the planted token's logit goes to 0 wherever latent 0 was on ...
    assert torch.allclose(off[active, TOKEN], torch.zeros(int(active.sum())), atol=1e-4 * float(clean.abs().max()))
    # ... and every other token's logit is only rescaled by the final RMSNorm (one factor per position)
    others = torch.ones(clean.shape[1], dtype=torch.bool)
    others[TOKEN] = False
    ratio = off[active][:, others] / clean[active][:, others]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-3, atol=1e-3)
    # a different latent changes the planted token only by that same rescaling (as for the witness token)
    other = _logits(lm, clamp(lm.model, sae, LAYER, [5], factor=0.0))
    ratio5 = other / clean
    seen = active & (clean[:, WITNESS].abs() > 0.05)
    assert seen.sum() >= 3
    assert torch.allclose(ratio5[seen, TOKEN], ratio5[seen, WITNESS], rtol=1e-3)
    # negative clamping (Yeo et al.) flips the readout
    neg = _logits(lm, clamp(lm.model, sae, LAYER, [0], factor=-1.0))
    assert (neg[active, TOKEN] < 0).all()


def test_attribution_finds_the_planted_latent(planted: tuple[LoadedModel, SparseAutoencoder, torch.Tensor]) -> None:
    lm, sae, u = planted
    attr = attributions(lm, sae, LAYER, PROMPTS, [TOKEN], batch_size=4)
    assert attr.shape == (len(PROMPTS), 64)
    assert int(attr.mean(0).argmax()) == 0 and (attr[:, 0] > 0).all()
    cand, cos = candidates(sae, u, 10)
    assert int(cand[0]) == 0 and float(cos[0]) == pytest.approx(1.0, abs=1e-5)
    assert int(select(attr, cand, 3)[0]) == 0
    # batching does not change attributions
    assert torch.allclose(attributions(lm, sae, LAYER, PROMPTS, [TOKEN], batch_size=1), attr, atol=1e-4)


def test_integrated_gradients_are_complete(planted: tuple[LoadedModel, SparseAutoencoder, torch.Tensor]) -> None:
    """Integrated gradients sum, over latents and tokens, to the refusal log-odds change from zeroing every
    latent (error term kept); gradient × activation is that sum's first-order estimate only."""
    lm, sae, _ = planted
    prompts = PROMPTS[2:4]

    def logodds(intervention: object = None) -> torch.Tensor:
        rows = []
        for p in prompts:
            ids = lm.tokenizer(lm.chat_prompt(p), add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                if intervention is None:
                    logits = lm.model(input_ids=ids).logits[:, -1]
                else:
                    with intervention:  # type: ignore[attr-defined]
                        logits = lm.model(input_ids=ids).logits[:, -1]
            rows.append(_logodds(logits, torch.tensor([TOKEN]))[0])
        return torch.stack(rows)

    change = logodds() - logodds(clamp(lm.model, sae, LAYER, list(range(64)), factor=0.0))
    assert change.abs().min() > 0.05  # the latents matter to the planted token here
    ig = attributions(lm, sae, LAYER, prompts, [TOKEN], batch_size=2, steps=32).sum(1)
    assert torch.allclose(ig, change, rtol=0.01, atol=1e-3), (ig, change)
    with pytest.raises(AtlasError, match="steps"):
        attributions(lm, sae, LAYER, prompts, [TOKEN], steps=0)


def test_attribution_from_a_reference_counts_what_the_fine_tune_moved(
        planted: tuple[LoadedModel, SparseAutoencoder, torch.Tensor]) -> None:
    """With the reference model's latents as the path's start, integrated gradients sum to the log-odds change
    from putting the reference's latents (on the same tokens) in place of the model's, error term kept."""
    lm, sae, _ = planted
    prompts = PROMPTS[2:4]
    own = block_states(lm.model)
    # the "reference": this model with the last block's MLP output halved (as if the fine-tune had grown it)
    ref = {b: {k: v.clone() for k, v in sd.items()} for b, sd in own.items()}
    for k in ref[LAYER]:
        if "down_proj" in k:
            ref[LAYER][k] *= 0.5
    assert torch.count_nonzero(attributions(lm, sae, LAYER, prompts, [TOKEN], reference_states=own)) == 0
    assert torch.equal(attributions(lm, sae, LAYER, prompts, [TOKEN], baseline=torch.zeros(64)),
                       attributions(lm, sae, LAYER, prompts, [TOKEN]))
    block = decoder_blocks(lm.model)[LAYER]

    def logodds(ids: torch.Tensor, f_ref: torch.Tensor | None) -> torch.Tensor:
        handle = None
        if f_ref is not None:
            put: torch.Tensor = f_ref

            def swap(module: object, args: object, output: Any) -> Any:
                h = hidden_from_output(output)
                f = sae.encode(h.float())
                return replace_hidden(output, (sae.decode(put) + h.float() - sae.decode(f)).to(h.dtype))

            handle = block.register_forward_hook(swap)
        try:
            with torch.no_grad():
                return _logodds(lm.model(input_ids=ids).logits[:, -1], torch.tensor([TOKEN]))[0]
        finally:
            if handle is not None:
                handle.remove()

    change = []
    kept: dict[str, torch.Tensor] = {}
    for p in prompts:
        ids = lm.tokenizer(lm.chat_prompt(p), add_special_tokens=False, return_tensors="pt")["input_ids"]
        hook = block.register_forward_hook(lambda m, a, o: kept.update(f=sae.encode(hidden_from_output(o).float())))
        try:
            with torch.no_grad(), restored_blocks(lm.model, ref, range(LAYER + 1)):
                lm.model(input_ids=ids)
        finally:
            hook.remove()
        change.append(logodds(ids, None) - logodds(ids, kept["f"]))
    moved = torch.stack(change)
    assert moved.abs().min() > 0.02  # the "fine-tune" matters to the planted token here
    ig = attributions(lm, sae, LAYER, prompts, [TOKEN], batch_size=2, steps=32, reference_states=ref).sum(1)
    assert torch.allclose(ig, moved, rtol=0.02, atol=1e-3), (ig, moved)
    with pytest.raises(AtlasError, match="not both"):
        attributions(lm, sae, LAYER, prompts, [TOKEN], baseline=torch.zeros(64), reference_states=ref)
    with pytest.raises(AtlasError, match="latents"):
        attributions(lm, sae, LAYER, prompts, [TOKEN], baseline=torch.zeros(3))


def test_candidate_pool_joins_the_refusal_direction(planted: tuple[LoadedModel, SparseAutoencoder, torch.Tensor]
                                                   ) -> None:
    _, sae, _ = planted
    node, refusal = sae.W_dec[3] + 0.5 * sae.W_dec[4], sae.W_dec[9]
    cand, cos = candidate_pool(sae, node, 2, refusal)
    assert cand.tolist()[:2] == [3, 4] and 9 in cand.tolist()[2:] and len(set(cand.tolist())) == len(cand)
    unit = node / node.norm()
    assert torch.allclose(cos, sae.unit_decoder()[cand] @ unit, atol=1e-6)  # cosine to the node's own direction
    assert torch.equal(candidate_pool(sae, node, 2)[0], candidates(sae, node, 2)[0])
    both, _ = candidate_pool(sae, node, 2, node)
    assert both.tolist() == [3, 4]  # nothing repeated


def test_token_capture_and_stats(planted: tuple[LoadedModel, SparseAutoencoder, torch.Tensor], tmp_path) -> None:
    lm, sae, _ = planted
    toks = capture_tokens(lm, PROMPTS, LAYER, responses=[None, "Sure, here it is.", None, None, None, None],
                          progress=False)
    full = _last_hidden(lm)  # reference: one prompt at a time, no padding
    starts = [len(lm.tokenizer(lm.chat_prompt(p), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    rows0 = toks.acts[toks.prompt_index == 0]
    assert torch.allclose(rows0, full[: starts[0]][toks.token_pos[toks.prompt_index == 0]], atol=1e-4)
    assert (toks.prompt_index == 1).sum() > (toks.prompt_index == 0).sum() - 5  # the response was appended
    toks.save(tmp_path / "t.safetensors")
    back = type(toks).load(tmp_path / "t.safetensors")
    assert torch.equal(back.acts, toks.acts) and back.token_ids == toks.token_ids and back.layer == LAYER
    means, tops = latent_stats(sae, toks, [0, 5], n_contexts=3, chunk=7)
    assert means.shape == (len(PROMPTS), 2) and len(tops[0]) == 3
    acts0 = sae.encode(toks.acts)[:, 0]
    assert float(acts0[tops[0][0]]) == pytest.approx(float(acts0.max()))
    assert "⟦" in toks.context(tops[0][0], 4, 2, lm.tokenizer.decode)


def test_overlap_distinct_vs_shared() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = 0.2 * torch.randn(30, 200, generator=gen)
    a, b = noise.clone(), 0.2 * torch.randn(30, 200, generator=gen)
    a[:, :20] += 1.0  # node A's mechanism: latents 0..19
    b[:, 100:120] += 1.0  # node B's: latents 100..119
    cand = torch.arange(200)
    table, self_agree = feature_overlap({"A": a, "B": b}, {"A": cand, "B": cand}, 20, n_boot=50)
    row = table.iloc[0]
    assert row["jaccard"] == 0.0 and row["distinct"] and not row["overlapping"]
    assert self_agree["A"] > 0.9
    shared_b = 0.2 * torch.randn(30, 200, generator=gen)
    shared_b[:, :20] += 1.0  # same mechanism
    table, _ = feature_overlap({"A": a, "B": shared_b}, {"A": cand, "B": cand}, 20, n_boot=50)
    assert table.iloc[0]["jaccard"] > 0.8 and table.iloc[0]["overlapping"] and not table.iloc[0]["distinct"]
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_token_capture_with_shared_prefix() -> None:
    """A system prompt makes a long common opening: it runs once (prefix reuse), rows stay exact."""
    lm = tiny_model("qwen2", seed=3)
    system = "You are a careful assistant who answers briefly and politely."
    toks = capture_tokens(lm, PROMPTS, 2, system=system, batch_size=4, progress=False)
    kept: dict[str, torch.Tensor] = {}
    h = decoder_blocks(lm.model)[2].register_forward_hook(lambda m, a, o: kept.update(h=hidden_from_output(o)))
    try:
        for i, p in enumerate(PROMPTS):
            ids = lm.tokenizer(lm.chat_prompt(p, system=system), add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                lm.model(input_ids=ids["input_ids"])
            mine = toks.acts[toks.prompt_index == i]
            assert torch.allclose(mine, kept["h"][0][toks.token_pos[toks.prompt_index == i]], atol=1e-4)
    finally:
        h.remove()
    from refusal_atlas.lm.prefix import plan_prefix

    assert plan_prefix(toks.token_ids, lm.model) >= 4  # the prefix path was taken


def test_token_budget_keeps_the_first_prompts(planted: tuple[LoadedModel, SparseAutoencoder, torch.Tensor]) -> None:
    lm, _, _ = planted
    full = capture_tokens(lm, PROMPTS, LAYER, progress=False)
    per_prompt = torch.bincount(full.prompt_index, minlength=len(PROMPTS))
    budget = int(per_prompt[:3].sum())
    part = capture_tokens(lm, PROMPTS, LAYER, max_tokens=budget, batch_size=2, progress=False)
    assert part.prompt_index.unique().tolist() == [0, 1, 2]
    assert torch.allclose(part.acts, full.acts[full.prompt_index < 3], atol=1e-4)  # same rows, prompt order
    cut = capture_tokens(lm, PROMPTS, LAYER, max_prompt_tokens=3, progress=False)
    assert torch.bincount(cut.prompt_index).max() == 3
