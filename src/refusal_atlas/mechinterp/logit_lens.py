"""Logit lens for directions: which output tokens does a residual-stream direction promote?

A direction that mostly promotes refusal-opening tokens ("I", "Sorry") acts on the *wording* of
the reply; one that promotes nothing in particular while still separating the node is more likely
a *detection* feature. We read a direction through the model's own final norm and unembedding.
The final norm is found architecture-agnostically: the module that consumes the last decoder
block's output on the way to the LM head (Llama `model.norm`, GPT-2 `transformer.ln_f`,
GPT-NeoX `final_layer_norm`, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position
from refusal_atlas.mechinterp.directions import DirectionSet


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the last block's output before the LM head (None if there is none)."""
    cached = getattr(model, "_refusal_atlas_final_norm", False)
    if cached is not False:
        return cast("nn.Module | None", cached)
    blocks = decoder_blocks(model)
    block_modules = {id(m) for m in blocks.modules()}
    head = cast(Any, model).get_output_embeddings()  # a transformers PreTrainedModel method
    last_out: list[Tensor] = []
    found: list[nn.Module] = []
    handles = [blocks[-1].register_forward_hook(lambda m, a, o: last_out.append(hidden_from_output(o)))]

    def make(mod: nn.Module) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if last_out and not found and args and isinstance(args[0], Tensor) and args[0] is last_out[-1]:
                found.append(m)
        return hook

    for mod in model.modules():
        if id(mod) in block_modules or mod is head or list(mod.children()):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_hook(make(mod)))
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device).unsqueeze(0)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    result = found[0] if found else None
    object.__setattr__(model, "_refusal_atlas_final_norm", result)
    return result


@torch.no_grad()
def direction_logits(lm: LoadedModel, direction: Tensor, *, apply_norm: bool = True) -> Tensor:
    """Logit change per vocabulary token caused by the direction, read through norm + unembedding.

    norm(v) − norm(0) removes the norm's bias (its gain and centering stay); the LM head's bias
    cancels the same way. The result is scale-free for RMSNorm/LayerNorm, so only ranks and
    relative sizes are meaningful.
    """
    model = lm.model
    head = model.get_output_embeddings()
    if head is None:
        raise AtlasError(f"{type(model).__name__}: no output embeddings to read a logit lens through")
    p = next(head.parameters())
    v = direction.detach().to(device=p.device, dtype=p.dtype).reshape(1, 1, -1)
    zero = torch.zeros_like(v)
    norm = final_norm(model) if apply_norm else None
    if norm is not None:
        v, zero = norm(v), norm(zero)
    return (head(v) - head(zero)).reshape(-1).float().cpu()


def promoted_tokens(lm: LoadedModel, direction: Tensor, k: int = 10, *, apply_norm: bool = True) -> pd.DataFrame:
    """The k most promoted and k most suppressed tokens (rank, token, logit z-score)."""
    logits = direction_logits(lm, direction, apply_norm=apply_norm)
    z = (logits - logits.mean()) / logits.std().clamp_min(1e-12)
    top = torch.topk(z, k)
    bottom = torch.topk(-z, k)
    rows = [{"sign": "promoted", "rank": i + 1, "token_id": int(t), "token": lm.tokenizer.decode([int(t)]),
             "z": float(z[t])} for i, t in enumerate(top.indices)]
    rows += [{"sign": "suppressed", "rank": i + 1, "token_id": int(t), "token": lm.tokenizer.decode([int(t)]),
              "z": float(z[t])} for i, t in enumerate(bottom.indices)]
    return pd.DataFrame(rows)


def token_set_score(lm: LoadedModel, direction: Tensor, token_ids: Sequence[int], *, apply_norm: bool = True) -> float:
    """Mean z-scored logit the direction gives a set of tokens (e.g. the refusal openers)."""
    if not token_ids:
        return float("nan")
    logits = direction_logits(lm, direction, apply_norm=apply_norm)
    z = (logits - logits.mean()) / logits.std().clamp_min(1e-12)
    return float(z[torch.as_tensor(list(token_ids), dtype=torch.long)].mean())


def wording_tokens(lm: LoadedModel, text: str, shared: str | None = None) -> list[int]:
    """Token ids of a refusal wording, minus those of the shared wording (what makes it node-specific)."""
    ids = set(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    ids |= set(lm.tokenizer(" " + text, add_special_tokens=False)["input_ids"])
    if shared:
        ids -= set(lm.tokenizer(shared, add_special_tokens=False)["input_ids"])
        ids -= set(lm.tokenizer(" " + shared, add_special_tokens=False)["input_ids"])
    return sorted(ids)


def lens_table(
    lm: LoadedModel,
    directions: DirectionSet,
    nodes: Sequence[str],
    position: Position,
    *,
    layers: Sequence[int] | None = None,
    method: str = "diff_means",
    k: int = 8,
    refusal_ids: Sequence[int] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(top tokens per node and layer, per node and layer refusal-token promotion z-score)."""
    top_rows, score_rows = [], []
    for node in nodes:
        for layer in layers or directions.layers:
            vec = directions.get(node, layer, position, method)
            if float(vec.norm()) == 0.0:
                continue
            tbl = promoted_tokens(lm, vec, k)
            tbl.insert(0, "layer", layer)
            tbl.insert(0, "node", node)
            top_rows.append(tbl[tbl["sign"] == "promoted"])
            score_rows.append({"node": node, "layer": layer, "refusal_token_z": token_set_score(lm, vec, refusal_ids)
                               if refusal_ids else np.nan,
                               "top_tokens": " ".join(repr(t) for t in tbl[tbl["sign"] == "promoted"]["token"][:5])})
    return (pd.concat(top_rows, ignore_index=True) if top_rows else pd.DataFrame(),
            pd.DataFrame(score_rows))
