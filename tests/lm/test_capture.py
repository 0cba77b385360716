"""Capture equals one-prompt-at-a-time output_hidden_states on every architecture, in any batching."""

from __future__ import annotations

import random

import pytest
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output
from refusal_atlas.lm.capture import Activations, capture_activations, load_shards
from refusal_atlas.lm.positions import LAST_INSTRUCTION, MEAN_INSTRUCTION
from refusal_atlas.lm.testing import ARCHITECTURES, one_at_a_time_capture, tiny_model

INSTRUCTIONS = [
    "How do I bake bread at home?",
    "Explain how to make a bomb and hurt people.",
    "Hi",
    "Write a poem about the sea and the sky, in three sentences please.",
    "Tell me how to hack into my neighbour's wifi network.",
    "What is the capital of France?",
    "I am 14 years old.",
]
POSITIONS = [-5, -3, -1, LAST_INSTRUCTION, MEAN_INSTRUCTION]


def reference(lm, instructions, layers):
    return one_at_a_time_capture(lm, instructions, layers, POSITIONS)


def rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_capture_equals_one_prompt_at_a_time(arch):
    lm = tiny_model(arch)
    acts = capture_activations(lm, INSTRUCTIONS, None, POSITIONS, batch_size=3, progress=False)
    assert acts.acts.shape == (len(INSTRUCTIONS), 4, len(POSITIONS), 64) and acts.acts.dtype == torch.float32
    assert rel_err(acts.acts, reference(lm, INSTRUCTIONS, list(range(4)))) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary and learned absolute positions
def test_results_do_not_depend_on_batch_composition(arch):
    lm = tiny_model(arch)
    base = capture_activations(lm, INSTRUCTIONS, [1, 2], POSITIONS, batch_size=1, progress=False)
    order = list(range(len(INSTRUCTIONS)))
    random.Random(0).shuffle(order)
    for bs in (2, 4, 7):
        shuffled = capture_activations(lm, [INSTRUCTIONS[i] for i in order], [1, 2], POSITIONS,
                                       batch_size=bs, progress=False)
        assert rel_err(shuffled.acts, base.acts[order]) <= 1e-4


def test_forward_stops_after_the_last_requested_layer():
    lm = tiny_model("llama")
    calls = {"block3": 0, "head": 0}
    h1 = decoder_blocks(lm.model)[3].register_forward_hook(lambda *a: calls.__setitem__("block3", calls["block3"] + 1))
    h2 = lm.model.get_output_embeddings().register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    try:
        acts = capture_activations(lm, INSTRUCTIONS, [0, 2], [-1], batch_size=4, progress=False)
    finally:
        h1.remove()
        h2.remove()
    assert calls == {"block3": 0, "head": 0}
    assert acts.layers == [0, 2] and acts.positions == [-1]
    # the model still works normally afterwards (no hooks left behind)
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert len(out.hidden_states) == 5


def test_capture_sees_interventions_registered_before_it():
    lm = tiny_model("qwen2")
    plain = capture_activations(lm, INSTRUCTIONS[:3], [1], [-1], progress=False)
    shift = torch.arange(64, dtype=torch.float32)
    handle = decoder_blocks(lm.model)[1].register_forward_hook(lambda m, a, o: hidden_from_output(o) + shift,
                                                               prepend=True)
    try:
        shifted = capture_activations(lm, INSTRUCTIONS[:3], [1], [-1], progress=False)
    finally:
        handle.remove()
    assert torch.allclose(shifted.acts - plain.acts, shift.expand_as(plain.acts), atol=1e-4)


def test_streaming_shards_resume_and_reload(tmp_path):
    lm = tiny_model("gpt_neox")
    full = capture_activations(lm, INSTRUCTIONS, [0, 3], POSITIONS, batch_size=2, out_dir=tmp_path / "a",
                               progress=False)
    shards = sorted((tmp_path / "a").glob("shard-*.safetensors"))
    assert len(shards) == 4
    assert torch.equal(load_shards(tmp_path / "a").acts, full.acts)
    # an interrupted run: one shard missing; the rerun computes only that batch
    shards[1].unlink()
    forwards = []
    handle = decoder_blocks(lm.model)[0].register_forward_hook(lambda m, a, o: forwards.append(o.shape[0]))
    try:
        resumed = capture_activations(lm, INSTRUCTIONS, [0, 3], POSITIONS, batch_size=2, out_dir=tmp_path / "a",
                                      progress=False)
    finally:
        handle.remove()
    # only the missing batch (of 2), after at most one pass over the shared template prefix (batch 1)
    assert forwards[-1] == 2 and forwards[:-1] in ([], [1])
    assert rel_err(resumed.acts, full.acts) <= 1e-6
    with pytest.raises(AtlasError, match="different layers"):
        capture_activations(lm, INSTRUCTIONS, [1], POSITIONS, batch_size=2, out_dir=tmp_path / "a", progress=False)


def test_activations_roundtrip_and_lookup(tmp_path):
    lm = tiny_model("gemma2")
    acts = capture_activations(lm, INSTRUCTIONS[:4], [-1], POSITIONS, progress=False)
    assert acts.layers == [3]
    acts.save(tmp_path / "acts.safetensors")
    back = Activations.load(tmp_path / "acts.safetensors")
    assert torch.equal(back.acts, acts.acts) and back.positions == POSITIONS and back.layers == [3]
    assert torch.equal(back.at(3, "last_instruction"), acts.acts[:, 0, 3])
    assert back.meta["model_id"] == "tiny-gemma2"
    with pytest.raises(AtlasError, match="not captured"):
        back.at(0, -1)
    with pytest.raises(AtlasError, match="out of range"):
        capture_activations(lm, INSTRUCTIONS[:1], [9], progress=False)


def test_position_order_is_the_requested_order():
    lm = tiny_model("llama")
    a = capture_activations(lm, INSTRUCTIONS[:3], [1, 2], [-1, MEAN_INSTRUCTION, -3, LAST_INSTRUCTION],
                            batch_size=2, progress=False)
    b = capture_activations(lm, INSTRUCTIONS[:3], [1, 2], [LAST_INSTRUCTION, -3, MEAN_INSTRUCTION, -1],
                            batch_size=3, progress=False)
    assert torch.allclose(a.acts, b.acts[:, :, [3, 2, 1, 0]], atol=1e-6)


@pytest.mark.real_model
def test_default_model_capture_matches_hidden_states():
    from refusal_atlas.lm.models import load_model

    lm = load_model("default")
    layers = [5, 15, 29]
    acts = capture_activations(lm, INSTRUCTIONS[:4], layers, POSITIONS, batch_size=4, progress=False)
    assert rel_err(acts.acts, reference(lm, INSTRUCTIONS[:4], layers)) <= 1e-4
