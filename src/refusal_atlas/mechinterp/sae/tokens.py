"""Token-level activations at one layer for SAE training: every token from the instruction on.

The template's opening (system prompt, role markers) is the same in every prompt and the first
token carries a huge-norm attention sink, so rows start at the instruction; an optional response
(the model's own answer) is appended after the chat prompt, as it would be generated. The file
keeps `prompt_index` and `token_pos` per row and the token ids, so latents' top contexts can be
shown as text later.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output
from refusal_atlas.lm.capture import accepts_position_ids, left_pad
from refusal_atlas.lm.generation import length_buckets
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import tokenize_prompts
from refusal_atlas.lm.prefix import SharedPrefix, plan_prefix


class _Stop(Exception):
    """Raised after the wanted block: nothing later in the model is needed."""


@dataclass
class TokenActivations:
    acts: Tensor  # [n_rows, d] float32
    prompt_index: Tensor  # [n_rows] long
    token_pos: Tensor  # [n_rows] long: position within the prompt's token ids
    token_ids: list[list[int]]  # per prompt, the full chat-formatted ids
    layer: int

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        flat = torch.tensor([t for ids in self.token_ids for t in ids], dtype=torch.long)
        offsets = torch.tensor([0, *torch.tensor([len(x) for x in self.token_ids]).cumsum(0).tolist()],
                               dtype=torch.long)
        tensors = {"acts": self.acts.contiguous(), "prompt_index": self.prompt_index, "token_pos": self.token_pos,
                   "token_ids": flat, "token_offsets": offsets}
        meta = {"layer": str(self.layer), "refusal_atlas": json.dumps(extra or {})}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path) -> TokenActivations:

        with safe_open(str(path), framework="pt") as f:
            layer = int((f.metadata() or {}).get("layer", "-1"))
        t = load_file(str(path))
        off = t["token_offsets"].tolist()
        ids = t["token_ids"].tolist()
        return cls(t["acts"], t["prompt_index"], t["token_pos"], [ids[a:b] for a, b in itertools.pairwise(off)],
                   layer)

    def context(self, row: int, before: int, after: int, decode: Any) -> str:
        """The text around one row's token, the token itself in ⟦ ⟧ (plain text: escape when rendering)."""
        ids = self.token_ids[int(self.prompt_index[row])]
        p = int(self.token_pos[row])
        return (decode(ids[max(0, p - before):p]) + "⟦" + decode(ids[p:p + 1]) + "⟧"
                + decode(ids[p + 1:p + 1 + after]))


def concat(parts: Sequence[TokenActivations]) -> TokenActivations:
    """Several captures of the same layer as one (prompt indices renumbered in order)."""
    offset = 0
    index, ids = [], []
    for part in parts:
        index.append(part.prompt_index + offset)
        ids.extend(part.token_ids)
        offset += len(part.token_ids)
    positions = torch.cat([p.token_pos for p in parts])
    return TokenActivations(torch.cat([p.acts for p in parts]), torch.cat(index), positions, ids, parts[0].layer)


def capture_tokens(
    lm: LoadedModel,
    instructions: Sequence[str],
    layer: int,
    *,
    responses: Sequence[str | None] | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    system: str | None = None,
    progress: bool = True,
) -> TokenActivations:
    """Output of block `layer` at every token from each instruction's start (responses appended).

    `max_prompt_tokens` cuts each prompt that many tokens after its instruction starts; `max_tokens` keeps
    the first prompts, in the order given, whose rows fit the budget (shuffle the prompts to sample).
    """
    if not instructions:
        raise AtlasError("no prompts to capture SAE training tokens from")
    if not 0 <= layer < lm.n_layers:
        raise AtlasError(f"layer {layer} out of range: the model has {lm.n_layers} decoder blocks")
    prompts = tokenize_prompts(lm, instructions, system=system)
    tok = lm.tokenizer
    ids: list[list[int]] = []
    for i, pt in enumerate(prompts):
        reply = responses[i] if responses is not None else None
        ids.append(list(pt.input_ids) + (tok(reply, add_special_tokens=False)["input_ids"] if reply else []))
    starts = [pt.instruction_start for pt in prompts]
    if max_prompt_tokens is not None:  # a few very long prompts (contextual HarmBench) must not crowd out the rest
        ids = [x[: starts[i] + max_prompt_tokens] for i, x in enumerate(ids)]
    chosen = list(range(len(ids)))
    if max_tokens is not None:  # the first prompts, in the caller's order, that fit the budget
        counts = torch.tensor([len(x) - s for x, s in zip(ids, starts, strict=True)]).cumsum(0)
        chosen = chosen[: max(1, int((counts <= max_tokens).sum()))]
    block: nn.Module = decoder_blocks(lm.model)[layer]
    kept: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        kept["h"] = hidden_from_output(output).detach()
        raise _Stop

    rows: list[Tensor] = []
    index: list[Tensor] = []
    pos: list[Tensor] = []
    use_pos = accepts_position_ids(lm.model)
    device = next(lm.model.parameters()).device
    order = [[chosen[j] for j in b] for b in length_buckets([len(ids[i]) for i in chosen], batch_size)]
    # the template's common opening (system prompt, role header) runs once; its rows are never kept
    n_prefix = plan_prefix([ids[i] for i in chosen], lm.model, enabled=use_pos, max_length=min(starts))
    bar = tqdm(total=len(chosen), desc="sae tokens", unit="prompt", disable=not progress, dynamic_ncols=True)
    handle = block.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            prefix = SharedPrefix.build(lm.model, ids[0][:n_prefix], stop=_Stop) if n_prefix else None
            kept.clear()
            for batch in order:
                if prefix is not None:
                    enc = prefix.batch_inputs([ids[i][n_prefix:] for i in batch], tok.pad_token_id, device)
                else:
                    enc = {k: v.to(device) for k, v in left_pad([ids[i] for i in batch], tok.pad_token_id).items()}
                    if not use_pos:
                        enc.pop("position_ids")
                    enc["use_cache"] = False
                input_ids = enc["input_ids"]
                assert isinstance(input_ids, Tensor)
                width = input_ids.shape[1]
                with contextlib.suppress(_Stop):
                    lm.model(**enc)
                h = kept.pop("h").float().cpu()
                for j, i in enumerate(batch):
                    pad = width - (len(ids[i]) - n_prefix)
                    keep = torch.arange(starts[i], len(ids[i]))
                    rows.append(h[j, pad + keep - n_prefix])
                    index.append(torch.full((len(keep),), i, dtype=torch.long))
                    pos.append(keep)
                bar.update(len(batch))
    finally:
        handle.remove()
        bar.close()
    # rows in prompt order (batches ran longest first), whatever the batching
    prompt_index = torch.cat(index)
    order_rows = torch.argsort(prompt_index * (max(len(x) for x in ids) + 1) + torch.cat(pos))
    return TokenActivations(torch.cat(rows)[order_rows], prompt_index[order_rows], torch.cat(pos)[order_rows], ids,
                            layer)
