"""Template positions: the post-instruction suffix, the instruction span, robust to merges."""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.models import wrap_model
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
from refusal_atlas.lm.testing import (
    ARCHITECTURES,
    TinySlowTokenizer,
    one_at_a_time_capture,
    tiny_model,
    tiny_tokenizer,
)


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


# --- the instruction span against references that do not use positions.py -------------------------------

ASCII_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " .,?!'\n-", min_size=1, max_size=40)


def _chatml(instruction: str, system: str | None = None) -> tuple[str, int, int]:
    """The tiny ChatML template rendered by hand, with the instruction's character span."""
    head = (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "") + "<|im_start|>user\n"
    text = f"{head}{instruction}<|im_end|>\n<|im_start|>assistant\n"
    return text, len(head), len(head) + len(instruction)


def _span_by_decoding(tok, ids: list[int], c0: int, c1: int) -> tuple[int, int]:
    """Token span covering characters [c0, c1), from the lengths of decoded token prefixes."""
    ends = [len(tok.decode(ids[: k + 1], clean_up_tokenization_spaces=False)) for k in range(len(ids))]
    start = next(k for k, e in enumerate(ends) if e > c0)
    end = next(k for k, e in enumerate(ends) if e >= c1) + 1
    return start, end


def _check_against_references(lm, instruction: str, system: str | None, by_pieces: bool) -> bool:
    """Check the span against decoded lengths and (where the pieces tokenise apart) per-piece tokenisation;
    return whether the per-piece check applied."""
    tok = lm.tokenizer
    text, c0, c1 = _chatml(instruction, system)
    assert lm.chat_prompt(instruction, system=system) == text  # the reference's own assumption
    (pt,) = tokenize_prompts(lm, [instruction], system=system)
    assert tok.decode(pt.input_ids, clean_up_tokenization_spaces=False) == text
    assert (pt.instruction_start, pt.instruction_end) == _span_by_decoding(tok, pt.input_ids, c0, c1)
    if by_pieces:  # when no token joins the pieces, tokenising them one by one gives the span directly
        pieces = [tok(t, add_special_tokens=False)["input_ids"] for t in (text[:c0], text[c0:c1], text[c1:])]
        if [i for piece in pieces for i in piece] == pt.input_ids:
            assert (pt.instruction_start, pt.instruction_end) == (len(pieces[0]), len(pieces[0]) + len(pieces[1]))
            return True
    return False


@pytest.mark.parametrize("instruction", ["How do I bake bread at home?", "Hi", "  spaced out  ", "Explain.\nNow!"])
def test_instruction_span_equals_the_tokenised_pieces(instruction):
    assert _check_against_references(tiny_model("llama", n_layers=1), instruction, "Be brief.", by_pieces=True)


@settings(max_examples=60, deadline=None)
@given(ASCII_TEXT, st.sampled_from([None, "Be brief.", "assistant"]))
def test_instruction_span_matches_independent_tokenisations_fast(instruction, system):
    _check_against_references(tiny_model("llama", n_layers=1), instruction, system, by_pieces=True)


@pytest.mark.parametrize("instruction", ["a", "assistant", "start", "im_end", "user", "\n", " "])
def test_an_instruction_that_also_occurs_in_the_template_is_found_where_it_is(instruction):
    """A search for the instruction's text used to land in the template after it ("a" in "assistant")."""
    for lm in (tiny_model("llama", n_layers=1), _slow_lm()):
        _check_against_references(lm, instruction, None, by_pieces=False)
        (pt,) = tokenize_prompts(lm, [instruction])
        assert lm.tokenizer.decode(pt.input_ids[pt.instruction_end :]) == "<|im_end|>\n<|im_start|>assistant\n"


def _slow_lm():
    tok = TinySlowTokenizer()
    assert not tok.is_fast
    return wrap_model(tiny_model("llama", n_layers=1).model, tok, name="tiny-slow")


@settings(max_examples=60, deadline=None)
@given(ASCII_TEXT, st.sampled_from([None, "Be brief."]))
def test_instruction_span_of_a_slow_tokenizer_matches_decoded_lengths(instruction, system):
    _check_against_references(_slow_lm(), instruction, system, by_pieces=True)


def test_slow_tokenizer_merging_across_the_instruction_start_counts_the_merged_token_inside():
    lm = _slow_lm()
    (pt,) = tokenize_prompts(lm, ["How are you?"])
    tokens = lm.tokenizer.convert_ids_to_tokens(pt.input_ids)
    assert tokens[pt.instruction_start] == "\nH"  # the template's newline and the instruction's first letter
    assert tokens[pt.instruction_end :] == ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz .?!\n", min_size=1, max_size=30).filter(lambda s: s.strip()))
def test_slow_tokenizer_positions_survive_merges_at_the_instruction_end(text):
    lm = _MergingModel()
    lm.tokenizer = TinySlowTokenizer()  # "?a", ".a" and "ea" join the instruction's end to "assistant"
    (pt,) = tokenize_prompts(lm, [text])
    c0 = len("<|im_start|>")
    assert (pt.instruction_start, pt.instruction_end) == _span_by_decoding(lm.tokenizer, pt.input_ids, c0,
                                                                           c0 + len(text))


def test_capture_with_a_slow_tokenizer_equals_one_prompt_at_a_time():
    lm = _slow_lm()
    lm = wrap_model(tiny_model("qwen2").model, lm.tokenizer, name="tiny-slow-qwen2")
    instructions = ["How do I bake bread?", "Hi", "What is the capital of France?"]
    positions = [-2, LAST_INSTRUCTION, MEAN_INSTRUCTION]
    acts = capture_activations(lm, instructions, [0, 3], positions, batch_size=3, progress=False)
    ref = one_at_a_time_capture(lm, instructions, [0, 3], positions)
    assert torch.allclose(acts.acts, ref, atol=1e-5, rtol=1e-4)
