"""Shared-prefix reuse gives the same activations and next-token distributions as full forward passes."""

from __future__ import annotations

import pytest
import torch

from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output, replace_hidden
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.positions import LAST_INSTRUCTION, MEAN_INSTRUCTION, tokenize_prompts
from refusal_atlas.lm.prefix import common_prefix_length, plan_prefix
from refusal_atlas.lm.testing import ARCHITECTURES, one_at_a_time_capture, tiny_model
from refusal_atlas.mechinterp.interventions import Intervention, ablation, addition
from refusal_atlas.mechinterp.scoring import next_token_logprobs

SYSTEM = "Be brief and kind."  # prompts stay inside the tiny Gemma 2 sliding window (64)
INSTRUCTIONS = [
    "How do I bake bread at home?",
    "Explain how to make a bomb and hurt people.",
    "Hi",
    "Write a poem about the sea and the sky, in three sentences please.",
    "Tell me how to hack into my neighbour's wifi network.",
]
POSITIONS = [-4, -1, LAST_INSTRUCTION, MEAN_INSTRUCTION]


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 8], [1, 2]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([]) == 0


def test_plan_leaves_the_needed_tail_and_respects_the_cap():
    lm = tiny_model("llama")
    seqs = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10, 11]]
    assert plan_prefix(seqs, lm.model) == 8
    assert plan_prefix(seqs, lm.model, keep_last=3) == 6
    assert plan_prefix(seqs, lm.model, max_length=5) == 5
    assert plan_prefix(seqs, lm.model, max_length=2) == 0  # too short to pay for itself
    assert plan_prefix(seqs, lm.model, enabled=False) == 0
    assert plan_prefix(seqs[:1], lm.model) == 0


def _reference(lm, instructions):
    return one_at_a_time_capture(lm, instructions, list(range(lm.n_layers)), POSITIONS, system=SYSTEM)


def _rel(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_capture_with_shared_prefix_equals_full_passes(arch):
    lm = tiny_model(arch)
    prompts = tokenize_prompts(lm, INSTRUCTIONS, system=SYSTEM)
    assert plan_prefix([p.input_ids for p in prompts], lm.model, max_length=min(p.instruction_start for p in prompts))
    shared = capture_activations(lm, INSTRUCTIONS, None, POSITIONS, batch_size=2, system=SYSTEM, progress=False)
    plain = capture_activations(lm, INSTRUCTIONS, None, POSITIONS, batch_size=2, system=SYSTEM, progress=False,
                                share_prefix=False)
    assert _rel(shared.acts, plain.acts) <= 1e-4
    assert _rel(shared.acts, _reference(lm, INSTRUCTIONS)) <= 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_next_token_logprobs_with_shared_prefix_and_interventions(arch):
    lm = tiny_model(arch)
    torch.manual_seed(0)
    direction = torch.randn(lm.d_model)
    for intervention in (None, ablation(lm.model, direction), addition(lm.model, 3 * direction, layer=1)):
        shared = next_token_logprobs(lm, INSTRUCTIONS, intervention=intervention, batch_size=2, system=SYSTEM)
        plain = next_token_logprobs(lm, INSTRUCTIONS, intervention=intervention, batch_size=2, system=SYSTEM,
                                    share_prefix=False)
        assert (shared - plain).abs().max().item() <= 1e-4
    # one at a time, no padding: the same distribution
    single = torch.cat([next_token_logprobs(lm, [x], system=SYSTEM) for x in INSTRUCTIONS])
    batched = next_token_logprobs(lm, INSTRUCTIONS, batch_size=4, system=SYSTEM)
    assert (single - batched).abs().max().item() <= 1e-4


def test_prompts_longer_than_a_sliding_window_are_not_shared():
    """Pads between prefix and tail would move keys out of the window: reuse is off, results exact."""
    lm = tiny_model("gemma2")
    long_system = "You are a careful assistant who answers in three sentences."
    prompts = tokenize_prompts(lm, INSTRUCTIONS, system=long_system)
    assert max(len(p.input_ids) for p in prompts) >= lm.model.config.sliding_window
    assert plan_prefix([p.input_ids for p in prompts], lm.model) == 0
    assert plan_prefix([[*p.input_ids[:40], 5] for p in prompts], lm.model) > 0


def test_position_dependent_intervention_disables_the_reuse():
    """A hook that edits only the first position of what it sees must not be fooled by the cache."""
    lm = tiny_model("llama")
    block = decoder_blocks(lm.model)[0]

    def install():
        def hook(module, args, output):
            h = hidden_from_output(output).clone()
            h[:, 0] += 50.0
            return replace_hidden(output, h)
        return [block.register_forward_hook(hook, prepend=True)]

    first_only = Intervention(install, "edit position 0", per_position=False)
    with_flag = next_token_logprobs(lm, INSTRUCTIONS[:1], intervention=first_only, system=SYSTEM)
    reference = next_token_logprobs(lm, INSTRUCTIONS[:1], intervention=first_only, system=SYSTEM,
                                    share_prefix=False)
    assert torch.allclose(with_flag, reference, atol=1e-5)
    both = next_token_logprobs(lm, INSTRUCTIONS[:2], intervention=first_only, system=SYSTEM)
    both_plain = next_token_logprobs(lm, INSTRUCTIONS[:2], intervention=first_only, system=SYSTEM,
                                     share_prefix=False)
    assert torch.allclose(both, both_plain, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_with_shared_prefix_matches_plain_generation(arch):
    lm = tiny_model(arch)
    shared = generate(lm, INSTRUCTIONS, max_new_tokens=6, batch_size=2, system=SYSTEM, progress=False)
    plain = generate(lm, INSTRUCTIONS, max_new_tokens=6, batch_size=2, system=SYSTEM, progress=False,
                     share_prefix=False)
    assert shared == plain
    assert any(shared) or arch == "gpt2"  # tiny GPT-2 ends every reply at once: only its first token is compared
    # under an intervention the prefix is computed with the hooks active
    steer = addition(lm.model, 5 * torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1)), layer=2)
    shared = generate(lm, INSTRUCTIONS, max_new_tokens=6, batch_size=2, system=SYSTEM, hooks=steer, progress=False)
    plain = generate(lm, INSTRUCTIONS, max_new_tokens=6, batch_size=2, system=SYSTEM, hooks=steer, progress=False,
                     share_prefix=False)
    assert shared == plain
