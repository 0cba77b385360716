"""Synthetic activations with a planted sparse dictionary (the trainer's known answer)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor


def planted(n: int = 40_000, d: int = 64, n_features: int = 128, active: float = 4.0,
            seed: int = 0) -> tuple[Tensor, Tensor]:
    """(acts [n, d], dictionary [n_features, d] of unit rows): each row is a sparse positive mix of rows."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    on = torch.rand(n, n_features, generator=g) < active / n_features
    magnitude = 0.5 + torch.rand(n, n_features, generator=g)
    acts = (on * magnitude) @ dictionary + 0.3 * torch.ones(d)  # an offset the decoder bias must absorb
    return acts, dictionary


def write_planted(path: Path, **kw: int) -> Tensor:
    acts, dictionary = planted(**kw)
    save_file({"acts": acts.contiguous()}, str(path), metadata={"layer": "3"})
    return dictionary


def recovered(w_dec: Tensor, dictionary: Tensor, threshold: float = 0.9) -> float:
    """Share of planted directions whose best-matching decoder row has cosine >= threshold."""
    unit = w_dec / w_dec.norm(dim=-1, keepdim=True)
    return float(((dictionary @ unit.T).max(dim=1).values >= threshold).float().mean())
