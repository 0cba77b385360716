"""Tiny randomly initialised chat models of several architectures, fully offline.

Used by the test-suite (and handy in notebooks): a small BPE tokenizer trained in memory with a
ChatML-style chat template, and Llama / Gemma 2 / Qwen 2 / GPT-2 / GPT-NeoX configs a few layers deep.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerFast
from transformers.tokenization_python import PythonBackend

from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output
from refusal_atlas.lm.models import LoadedModel, wrap_model
from refusal_atlas.lm.positions import LAST_INSTRUCTION, MEAN_INSTRUCTION, Position, tokenize_prompts

ARCHITECTURES = ("llama", "gemma2", "qwen2", "gpt2", "gpt_neox")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "How do I bake bread at home with simple ingredients?",
    "Explain how to make a bomb and hurt people.",
    "Write a poem about the sea and the sky.",
    "I cannot help with that request. I'm sorry, but I can't assist.",
    "Sure, here is a recipe with flour, water, salt and yeast.",
    "Tell me how to hack into my neighbour's wifi network.",
    "What is the capital of France? Paris is the capital.",
    "As a licensed chemist I need the synthesis route for research.",
    "I am 14 years old and want to buy a gun without my parents knowing.",
    "Summarise the plot of a novel in three sentences, please.",
]


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab ~400) with ChatML special tokens and a chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(
    arch: str, *, n_layers: int = 4, d_model: int = 64, vocab_size: int | None = None, sliding_window: int = 64
) -> PreTrainedConfig:
    """A small config of `arch`; `sliding_window` applies to Gemma 2's local-attention layers."""
    vocab = vocab_size or len(tiny_tokenizer())
    common = {"vocab_size": vocab}
    if arch == "gpt2":
        kw = {"n_layer": n_layers, "n_embd": d_model, "n_head": 4, "n_positions": 512}
    elif arch == "gpt_neox":
        kw = {"num_hidden_layers": n_layers, "hidden_size": d_model, "num_attention_heads": 4,
              "intermediate_size": 4 * d_model, "max_position_embeddings": 512}
    else:
        kw = {"num_hidden_layers": n_layers, "hidden_size": d_model, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 2 * d_model, "max_position_embeddings": 512}
        if arch == "gemma2":
            kw.update(head_dim=16, sliding_window=sliding_window, query_pre_attn_scalar=16)
    tok = tiny_tokenizer()
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    return AutoConfig.for_model(arch, **common, **kw, **ids)


def tiny_model(
    arch: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 4,
    d_model: int = 64,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    sliding_window: int = 64,
) -> LoadedModel:
    """A randomly initialised causal LM of the given architecture in eval mode (float32, eager attention
    unless asked otherwise; the weights are drawn in float32 from `seed` and then cast)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    torch.manual_seed(seed)
    config = tiny_config(arch, n_layers=n_layers, d_model=d_model, sliding_window=sliding_window)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    model = model.to(dtype)
    return wrap_model(model, tiny_tokenizer(), name=f"tiny-{arch}")


def _pick(hidden: torch.Tensor, position: Position, start: int, end: int) -> torch.Tensor:
    """One prompt's [d_model] vector at `position` from its [seq, d_model] hidden states."""
    if position == LAST_INSTRUCTION:
        return hidden[end - 1]
    if position == MEAN_INSTRUCTION:
        return hidden[start:end].mean(0)
    assert isinstance(position, int)
    return hidden[position]


def one_at_a_time_capture(
    lm: LoadedModel,
    instructions: Sequence[str],
    layers: Sequence[int],
    positions: Sequence[Position],
    system: str | None = None,
) -> torch.Tensor:
    """Ground truth for capture tests: one prompt at a time, no padding, no cache, `output_hidden_states`.

    hidden_states[l + 1] is block l's output; HF replaces the last one by the final-norm output, so the
    last block is read with a plain hook. Returns [n, len(layers), len(positions), d_model], float32.
    """
    out = torch.empty(len(instructions), len(layers), len(positions), lm.d_model)
    kept: dict[str, torch.Tensor] = {}
    handle = decoder_blocks(lm.model)[-1].register_forward_hook(lambda m, a, o: kept.update(h=hidden_from_output(o)))
    try:
        for i, pt in enumerate(tokenize_prompts(lm, instructions, system=system)):
            with torch.inference_mode():
                hs = lm.model(input_ids=torch.tensor([pt.input_ids]), output_hidden_states=True).hidden_states
            s, e = pt.instruction_start, pt.instruction_end
            for j, layer in enumerate(layers):
                h = (kept["h"] if layer == lm.n_layers - 1 else hs[layer + 1])[0]
                out[i, j] = torch.stack([_pick(h, p, s, e) for p in positions])
    finally:
        handle.remove()
    return out


_SLOW_PIECES = ("\nH", "\nW", "\nE", "user", "ass", "istant", "?a", ".a", "ea", "the", " the", "ing", " a", "ow", "I ")


class TinySlowTokenizer(PythonBackend):
    """A pure-Python ("slow", no character offsets) tokenizer: greedy longest match over printable ASCII and a
    few multi-character pieces, some of which straddle the chat template's edges (`"\\nH"` joins the
    template's newline to an instruction's first letter), as remote-code tokenizers can.
    """

    def __init__(self, **kwargs: Any) -> None:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<unk>"]
        pieces = specials + sorted(set(string.printable)) + list(_SLOW_PIECES)
        self._vocab = {t: i for i, t in enumerate(dict.fromkeys(pieces))}
        self._tokens = {i: t for t, i in self._vocab.items()}
        self._longest = max(len(t) for t in self._vocab)
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        super().__init__(unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>",
                         additional_special_tokens=["<|endoftext|>"], **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        out, i = [], 0
        while i < len(text):
            n = next((n for n in range(min(self._longest, len(text) - i), 0, -1) if text[i : i + n] in self._vocab), 0)
            out.append(text[i : i + n] if n else "<unk>")
            i += max(n, 1)
        return out

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self._vocab["<unk>"])

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)
