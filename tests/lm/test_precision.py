"""Capture in bfloat16 / float16, with SDPA or eager attention, under left padding and with a Gemma 2
sliding window shorter than the prompts, equals one prompt at a time without padding.

Tolerance: the largest relative error per captured vector, ‖batched − single‖ / ‖single‖, in units of
the dtype's machine epsilon (bf16 2^-7, fp16 2^-10, fp32 2^-23):
- half precision: 3 eps. Both paths store every block output in the dtype, so each value carries up
  to eps/2 of rounding, and the padded and unpadded passes round differently (their attention
  reductions run over different widths); measured worst case 0.95 eps over five architectures,
  two attention kernels and every layer and position, so 3 eps leaves 3x headroom. Letting the
  queries see the pads costs 5 to 700 eps (a negative control below checks it exceeds the bound).
- float32: 32 eps. Nothing hides the different summation orders there; measured worst 4 eps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from refusal_atlas.lm.capture import capture_activations, left_pad
from refusal_atlas.lm.positions import LAST_INSTRUCTION, MEAN_INSTRUCTION, tokenize_prompts
from refusal_atlas.lm.prefix import plan_prefix
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
ULPS = {torch.bfloat16: 3, torch.float16: 3, torch.float32: 32}


def tolerance(dtype: torch.dtype) -> float:
    return ULPS[dtype] * torch.finfo(dtype).eps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max().item()


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        x = torch.ones(1, 1, 4, 8, dtype=dtype)
        F.scaled_dot_product_attention(x, x, x)
        return bool(torch.isfinite((x @ x.transpose(-1, -2)).float()).all())
    except RuntimeError:
        return False


def _cases() -> list:
    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        marks = [] if _cpu_supports(dtype) else [pytest.mark.skip(reason=f"this CPU's torch has no {dtype} kernels")]
        for arch in ARCHITECTURES:
            # transformers refuses SDPA for Gemma 2 (its attention soft-capping needs the eager kernel)
            for attn in ("eager",) if arch == "gemma2" else ("sdpa", "eager"):
                if dtype == torch.float32 and attn == "eager":
                    continue  # float32 eager under left padding: test_capture.py
                cases.append(pytest.param(arch, dtype, attn, marks=marks, id=f"{arch}-{str(dtype)[6:]}-{attn}"))
    return cases


def _pads_visible_error(lm, layers: list[int], ref: torch.Tensor) -> float:
    """Negative control: the same left-padded batch with the pads left unmasked (a padding bug)."""
    batch = left_pad([p.input_ids for p in tokenize_prompts(lm, INSTRUCTIONS)], lm.tokenizer.pad_token_id)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    with torch.inference_mode():
        hidden = lm.model(**batch, output_hidden_states=True).hidden_states
    got = torch.stack([hidden[layer + 1][:, -1].float() for layer in layers], 1)
    return rel_err(got, ref[:, :, POSITIONS.index(-1)])


@pytest.mark.parametrize(("arch", "dtype", "attn"), _cases())
def test_capture_under_left_padding_equals_one_prompt_at_a_time(arch, dtype, attn):
    lm = tiny_model(arch, dtype=dtype, attn_implementation=attn)
    assert next(lm.model.parameters()).dtype == dtype
    assert lm.model.config._attn_implementation == attn
    ref = one_at_a_time_capture(lm, INSTRUCTIONS, [0, 1, 2, 3], POSITIONS)
    tol = tolerance(dtype)
    for share_prefix in (True, False):
        acts = capture_activations(lm, INSTRUCTIONS, None, POSITIONS, batch_size=3, progress=False,
                                   share_prefix=share_prefix)
        assert acts.acts.dtype == torch.float32 and torch.isfinite(acts.acts).all()
        assert rel_err(acts.acts, ref) <= tol, (share_prefix, rel_err(acts.acts, ref) / torch.finfo(dtype).eps)
    # the bound is tight enough to see a padding bug on this architecture and dtype
    assert _pads_visible_error(lm, [0, 1, 2], ref[:, :3]) > tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma2_prompts_longer_than_the_sliding_window_with_padding(dtype):
    window = 8
    lm = tiny_model("gemma2", dtype=dtype, sliding_window=window)
    assert lm.model.config.sliding_window == window and "sliding_attention" in lm.model.config.layer_types
    lengths = [len(p.input_ids) for p in tokenize_prompts(lm, INSTRUCTIONS)]
    assert min(lengths) > window and max(lengths) > 2 * window and len(set(lengths)) > 3  # padding at every width
    ids = [p.input_ids for p in tokenize_prompts(lm, INSTRUCTIONS)]
    assert plan_prefix(ids, lm.model) == 0  # pads between a shared prefix and the tail would move the window
    ref = one_at_a_time_capture(lm, INSTRUCTIONS, [0, 1, 2, 3], POSITIONS)
    for batch_size in (3, 7):
        acts = capture_activations(lm, INSTRUCTIONS, None, POSITIONS, batch_size=batch_size, progress=False)
        assert rel_err(acts.acts, ref) <= tolerance(dtype)
    # the window really cuts: without it the same weights give other activations at the last positions
    unwindowed = tiny_model("gemma2", dtype=dtype, sliding_window=512)
    far = one_at_a_time_capture(unwindowed, INSTRUCTIONS, [3], [-1])
    assert rel_err(far, ref[:, 3:, 2:3]) > 0.1
