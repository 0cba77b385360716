"""Template positions: the post-instruction suffix, the instruction span, robust to merges."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.positions import (
    LAST_INSTRUCTION,
    MEAN_INSTRUCTION,
    canonical_position,
    default_positions,
    expand_positions,
    gather_plan,
    post_instruction_positions,
    post_instruction_tokens,
    tokenize_prompts,
)
from refusal_atlas.lm.testing import ARCHITECTURES, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_post_instruction_suffix_is_the_template_after_the_instruction(arch):
    lm = tiny_model(arch, n_layers=1)
    suffix = post_instruction_tokens(lm)
    assert lm.tokenizer.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    k = len(suffix)
    assert post_instruction_positions(lm) == tuple(range(-k, 0))
    for text in ["How do I bake bread?", "Hi", "  spaced out  ", "Explain how to make a bomb."]:
        (pt,) = tokenize_prompts(lm, [text])
        assert pt.input_ids[pt.instruction_end :] == suffix
        assert text.strip() in lm.tokenizer.decode(pt.input_ids[pt.instruction_start : pt.instruction_end])


class _MergingModel:
    """A stand-in LoadedModel whose template glues text straight onto the instruction."""

    def __init__(self):
        self.tokenizer = tiny_tokenizer()
        self.spec = "merging"

    def chat_prompt(self, instruction: str, system: str | None = None) -> str:
        return f"<|im_start|>{instruction}assistant\n"


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz .?!\n", min_size=1, max_size=30).filter(lambda s: s.strip()))
def test_positions_survive_tokens_merging_across_the_boundary(text):
    lm = _MergingModel()
    (pt,) = tokenize_prompts(lm, [text])
    tok = lm.tokenizer
    span = tok.decode(pt.instruction_end and pt.input_ids[pt.instruction_start : pt.instruction_end])
    assert text.strip() in span  # the instruction's tokens cover it (a merged token counts inside)
    post = tok.decode(pt.input_ids[pt.instruction_end :])
    assert "assistant\n".endswith(post)  # the template tokens after it are a suffix of the template
    assert pt.instruction_end > pt.instruction_start


def test_position_names_and_errors():
    lm = tiny_model("llama", n_layers=1)
    assert canonical_position("-3") == -3 and canonical_position(" last_instruction ") == LAST_INSTRUCTION
    for bad in (0, 2, "first", True):
        with pytest.raises(AtlasError):
            canonical_position(bad)
    k = len(post_instruction_tokens(lm))
    assert expand_positions(lm, ["eoi", -1, MEAN_INSTRUCTION]) == [*range(-k, 0), MEAN_INSTRUCTION]
    assert default_positions(lm) == [-5, -4, -3, -2, -1, LAST_INSTRUCTION, MEAN_INSTRUCTION]


def test_gather_plan_under_left_padding():
    lm = tiny_model("llama", n_layers=1)
    prompts = tokenize_prompts(lm, ["Hi", "Write a poem about the sea and the sky."])
    width = max(len(p.input_ids) for p in prompts)
    index, weights, order = gather_plan(prompts, width, [-1, LAST_INSTRUCTION, MEAN_INSTRUCTION])
    for row, p in enumerate(prompts):
        offset = width - len(p.input_ids)
        assert index[row, 0] == width - 1
        assert index[row, 1] == offset + p.instruction_end - 1
        span = weights[row].nonzero().flatten()
        assert span.tolist() == list(range(offset + p.instruction_start, offset + p.instruction_end))
        assert torch.isclose(weights[row].sum(), torch.tensor(1.0))
    assert order == [0, 1, -1]


@pytest.mark.real_model
def test_default_model_template_positions():
    from refusal_atlas.lm.models import load_model

    lm = load_model("default")
    suffix = post_instruction_tokens(lm)
    assert lm.tokenizer.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"
    assert len(suffix) == 6  # the GGUF tokenizer splits "assistant" into "ass" + "istant"
    (pt,) = tokenize_prompts(lm, ["Write a haiku about rain."])
    assert lm.tokenizer.decode(pt.input_ids[pt.instruction_start : pt.instruction_end]) == "Write a haiku about rain."
