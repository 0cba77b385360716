"""Interventions on tiny models of every architecture: ablation, addition, weight orthogonalization."""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import load_model, wrap_model
from refusal_atlas.lm.testing import ARCHITECTURES, tiny_model
from refusal_atlas.mechinterp.interventions import (
    ablation,
    addition,
    compose,
    layer_subset,
    orthogonalize_weights,
    residual_writers,
    save_orthogonalized,
    unit,
)

PROMPTS = ["How do I bake bread at home?", "Tell me how to hack into my neighbour's wifi network."]


def _batch(lm):
    texts = [lm.chat_prompt(p) for p in PROMPTS]
    return lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _direction(lm, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.d_model, generator=g) * 3.0


def _fresh(model):
    """A deep copy without the cached block / writer lookups (they point at the original's modules)."""
    m = copy.deepcopy(model)
    for attr in ("_refusal_atlas_blocks", "_refusal_atlas_writers"):
        if hasattr(m, attr):
            object.__delattr__(m, attr)
    return m


@pytest.fixture(scope="module", params=ARCHITECTURES)
def lm(request):
    return tiny_model(request.param)


def test_ablation_removes_component_everywhere(lm):
    r = _direction(lm)
    ru = unit(r)
    enc = _batch(lm)
    intervention = ablation(lm.model, r)  # built first: finding the writers runs one probe forward
    seen: list[torch.Tensor] = []
    # A plain (appended) hook runs after the prepended intervention: it must see the cleaned stream.
    handles = [b.register_forward_hook(lambda m, a, o: seen.append(hidden_from_output(o).detach()))
               for b in decoder_blocks(lm.model)]
    try:
        with torch.no_grad(), intervention:
            out = lm.model(**enc, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == lm.n_layers
    for h in seen:
        assert (h @ ru).abs().max() < 1e-4
    # output_hidden_states shows post-intervention values (hooks are prepended); the last entry is
    # after the final norm, which re-scales dimensions, so it is excluded.
    for h in out.hidden_states[:-1]:
        assert (h @ ru).abs().max() < 1e-4
    with torch.no_grad():
        clean = lm.model(**enc, output_hidden_states=True)
    assert max(float((h @ ru).abs().max()) for h in clean.hidden_states[1:-1]) > 1e-2
    assert not torch.allclose(clean.logits, out.logits, atol=1e-5)


def test_hooks_are_removed_on_exit(lm):
    enc = _batch(lm)
    with torch.no_grad():
        before = lm.model(**enc).logits
        with ablation(lm.model, _direction(lm)), addition(lm.model, _direction(lm, 2), 1, coeff=4.0):
            pass
        after = lm.model(**enc).logits
    assert torch.equal(before, after)


def test_ablation_at_chosen_layers_only(lm):
    r = _direction(lm)
    ru = unit(r)
    enc = _batch(lm)
    with torch.no_grad(), ablation(lm.model, r, layers=[1]):
        out = lm.model(**enc, output_hidden_states=True)
    assert (out.hidden_states[2] @ ru).abs().max() < 1e-4  # block 1's output
    assert (out.hidden_states[1] @ ru).abs().max() > 1e-3  # block 0's output untouched
    with pytest.raises(AtlasError, match="out of range"):
        ablation(lm.model, r, layers=[99])


def test_addition_shifts_by_exactly_coeff_times_vector(lm):
    v = _direction(lm, 3)
    enc = _batch(lm)
    layer, coeff = 1, 2.5
    with torch.no_grad():
        clean = lm.model(**enc, output_hidden_states=True).hidden_states
        with addition(lm.model, v, layer, coeff=coeff):
            steered = lm.model(**enc, output_hidden_states=True).hidden_states
    diff = steered[layer + 1] - clean[layer + 1]
    torch.testing.assert_close(diff, (coeff * v).expand_as(diff), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steered[layer], clean[layer])  # earlier layers unchanged
    block = decoder_blocks(lm.model)[layer]
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))  # runs after ours
    try:
        with torch.no_grad(), addition(lm.model, v, layer, coeff=coeff, at="input"):
            lm.model(**enc)
    finally:
        handle.remove()
    # block `layer`'s input is block `layer-1`'s output (hidden_states[layer]) plus the vector
    torch.testing.assert_close(seen[0] - clean[layer], (coeff * v).expand_as(diff), atol=1e-4, rtol=1e-4)


def test_orthogonalized_weights_match_hook_ablation(lm):
    r = _direction(lm)
    enc = _batch(lm)
    with torch.no_grad(), ablation(lm.model, r):
        hooked = lm.model(**enc).logits
    edited = _fresh(lm.model)
    if residual_writers(lm.model).has_post_norms:  # Gemma 2: a norm follows o_proj / down_proj
        with pytest.raises(AtlasError, match="post-sublayer norms"):
            orthogonalize_weights(edited, r)
        return
    orthogonalize_weights(edited, r)
    with torch.no_grad():
        ortho = edited(**enc).logits
        clean = lm.model(**enc).logits
    torch.testing.assert_close(ortho, hooked, atol=1e-4, rtol=1e-4)
    assert (clean - hooked).abs().max() > 1e-4  # the comparison is not vacuous
    # the original model is untouched (edits went to the copy; tied heads were untied)
    torch.testing.assert_close(lm.model(**enc).logits.detach(), clean)


def test_residual_writers_found_architecture_agnostically(lm):
    found = residual_writers(lm.model)
    assert len(found.writers) == lm.n_layers
    assert all(len(w) == 2 for w in found.writers)  # attention-out and MLP-down in every block
    assert found.embeddings
    names = {id(m): n for n, m in lm.model.named_modules()}
    writer_names = [names[id(m)].rsplit(".", 1)[-1] for m in found.writers[0]]
    assert writer_names in (["o_proj", "down_proj"], ["c_proj", "c_proj"], ["dense", "dense_4h_to_h"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_saved_orthogonalized_model_reloads(arch, tmp_path):
    lm = tiny_model(arch)
    r = _direction(lm)
    enc = _batch(lm)
    with torch.no_grad(), ablation(lm.model, r):
        hooked = lm.model(**enc).logits
    folder = save_orthogonalized(lm, r, tmp_path / "ortho")
    assert list(folder.glob("*.safetensors"))
    loaded = load_model(folder)  # default attention kernel: compare real (unpadded) positions only
    with torch.no_grad():
        reloaded = loaded.model(**enc).logits
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(reloaded[keep], hooked[keep], atol=1e-4, rtol=1e-4)


def test_generate_accepts_interventions_as_hook_factories():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    # Planted: the direction the model reads its first clean reply token t from (t's unembedding row
    # scaled by the final norm's gain). With it ablated, t's first-step logit is exactly 0.
    with torch.no_grad():
        first = lm.model(**_batch(lm)).logits[:, -1].argmax(-1)
        r = lm.model.model.norm.weight * lm.model.lm_head.weight[first[0]]
    clean = generate(lm, PROMPTS, max_new_tokens=6, progress=False)
    assert tok.decode([int(first[0])]).strip() and clean[0].startswith(tok.decode([int(first[0])]).strip())
    ablated = generate(lm, PROMPTS, max_new_tokens=6, progress=False, hooks=ablation(lm.model, r))
    # the same intervention done independently, by editing the weights, gives the same replies
    edited = _fresh(lm.model)
    orthogonalize_weights(edited, r)
    with torch.no_grad():
        edited_logits = edited(**_batch(lm)).logits[:, -1]
    assert abs(edited_logits[0, first[0]].item()) < 1e-5
    expected = generate(wrap_model(edited, tok, "edited"), PROMPTS, max_new_tokens=6, progress=False)
    assert ablated == expected
    assert ablated[0] != clean[0]  # prompt 0's first reply token can no longer win
    steered = generate(lm, PROMPTS, max_new_tokens=6, progress=False,
                       hooks=compose(addition(lm.model, r, 2, coeff=20.0)))
    again = generate(lm, PROMPTS, max_new_tokens=6, progress=False, hooks=ablation(lm.model, r))
    assert ablated == again  # deterministic, hooks removed between batches
    assert steered != clean
    assert generate(lm, PROMPTS, max_new_tokens=6, progress=False) == clean


def test_zero_direction_is_an_error():
    lm = tiny_model("llama")
    with pytest.raises(AtlasError, match="zero"):
        ablation(lm.model, torch.zeros(lm.d_model))


def test_layer_subset():
    assert layer_subset(30, 5, 0.8) == [2, 7, 12, 16, 21]
    assert layer_subset(4, 10) == [0, 1, 2, 3]


def test_subspace_ablation_removes_every_row_and_equals_orthogonal_ablations_in_turn(lm):
    from refusal_atlas.mechinterp.interventions import Intervention, orthonormal_rows

    a, b = _direction(lm, 1), _direction(lm, 2)  # not orthogonal to each other
    enc = _batch(lm)
    cone = ablation(lm.model, torch.stack([a, b]))  # built first: finding the writers runs one probe forward
    seen: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda m, args, o: seen.append(hidden_from_output(o).detach()))
               for blk in decoder_blocks(lm.model)]
    try:
        with torch.no_grad(), cone:
            both = lm.model(**enc).logits
    finally:
        for h in handles:
            h.remove()
    for h in seen:  # neither vector (nor any mix of them) is left in the stream
        assert (h @ unit(a)).abs().max() < 1e-4 and (h @ unit(b)).abs().max() < 1e-4
    q = orthonormal_rows(torch.stack([a, b]))
    assert torch.allclose(q @ q.T, torch.eye(2), atol=1e-5)
    first, second = ablation(lm.model, q[0]), ablation(lm.model, q[1])
    turn = Intervention(lambda: [*first._install(), *second._install()], "two orthogonal ablations")
    with torch.no_grad(), turn:
        seq = lm.model(**enc).logits
    assert torch.allclose(both, seq, atol=1e-4)
    with pytest.raises(AtlasError):
        orthonormal_rows(torch.stack([a, 2 * a]))
