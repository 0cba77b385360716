"""Clamping SAE latents inside the model, with the SAE's error term kept.

At block `layer`'s output h: f = encode(h); the chosen latents become f·factor (or a fixed value);
the block outputs h + decode(f') − decode(f). Everything the SAE fails to reconstruct, and every
latent not chosen, passes through unchanged: only the chosen latents' contribution moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output, replace_hidden
from refusal_atlas.mechinterp.interventions import Intervention
from refusal_atlas.mechinterp.sae.model import SparseAutoencoder


def clamp_latents(h: Tensor, sae: SparseAutoencoder, features: Tensor, *, factor: float | None = None,
                  value: float | None = None) -> Tensor:
    """h with the chosen latents scaled by `factor` (or set to `value`), error term kept."""
    x = h.float()
    f = sae.encode(x)
    g = f.clone()
    g[..., features] = f[..., features] * factor if factor is not None else torch.full_like(f[..., features],
                                                                                            float(value or 0.0))
    return (x + sae.decode(g, x) - sae.decode(f, x)).to(h.dtype)


def clamp(model: nn.Module, sae: SparseAutoencoder, layer: int, features: Sequence[int], *,
          factor: float | None = -1.0, value: float | None = None) -> Intervention:
    """An `Intervention` clamping `features` at block `layer` (every position): multiply by `factor`
    (Yeo et al.: −3 on Gemma-2-2B, −1 on Llama-3.1-8B) or, with `factor=None`, set them to `value`."""
    blocks = decoder_blocks(model)
    if not 0 <= layer < len(blocks):
        raise AtlasError(f"layer {layer} out of range: the model has {len(blocks)} decoder blocks")
    if factor is None and value is None:
        raise AtlasError("clamp needs a factor or a value")
    feats = torch.as_tensor(list(features), dtype=torch.long)
    if feats.numel() and (feats.min() < 0 or feats.max() >= sae.cfg.d_sae):
        raise AtlasError(f"feature ids must be in 0..{sae.cfg.d_sae - 1}")
    device = next(model.parameters()).device

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return replace_hidden(output, clamp_latents(hidden_from_output(output), sae, feats, factor=factor,
                                                    value=value))

    def install() -> list[RemovableHandle]:
        sae.to(device)
        return [blocks[layer].register_forward_hook(hook, prepend=True)]

    how = f"× {factor}" if factor is not None else f"= {value}"
    return Intervention(install, f"clamp {feats.numel()} SAE latents {how} (layer {layer})")
