"""A sparse autoencoder with SAELens's parameterisation: standard (ReLU), TopK and JumpReLU.

encode: f = act((x_in − b_dec·apply_b_dec_to_input) @ W_enc + b_enc), decode: f @ W_dec + b_dec, where x_in
is x after the run-time normalisation SAELens applies (`layer_norm`, `constant_norm_rescale`; `none` and
`expected_average_only_in` are the identity at inference time, as in SAELens). The same arithmetic,
in the same order, as SAELens's inference classes, so outputs agree to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass
class SAEConfig:
    """The fields of SAELens's `cfg.json` this package reads and writes (others are kept in `extra`)."""

    architecture: str
    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": "none",
            "metadata": dict(self.metadata),
        }
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return out

    @property
    def hook_layer(self) -> int | None:
        layer = self.metadata.get("hook_layer")
        return int(layer) if isinstance(layer, int | float | str) and str(layer).lstrip("-").isdigit() else None


class SparseAutoencoder(nn.Module):
    """Parameters W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in] (+ threshold for JumpReLU)."""

    def __init__(self, cfg: SAEConfig, weights: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold: nn.Parameter | None = (
            nn.Parameter(torch.zeros(d_sae)) if cfg.architecture == "jumprelu" else None
        )
        if weights is not None:
            with torch.no_grad():
                for name, value in weights.items():
                    getattr(self, name).copy_(value.to(torch.float32))
        self.requires_grad_(False)  # an inference object: gradients flow to inputs and latents, not weights

    # -- inference ---------------------------------------------------------------------------

    def _norm_in(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, coeff, None
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)
            return centred / (std + 1e-5), mu, std
        return x, None, None

    def pre_activation(self, x: Tensor) -> Tensor:
        x_in, _, _ = self._norm_in(x.to(self.W_enc.dtype))
        if self.cfg.apply_b_dec_to_input:
            x_in = x_in - self.b_dec
        return x_in @ self.W_enc + self.b_enc

    def activate(self, hidden_pre: Tensor) -> Tensor:
        arch = self.cfg.architecture
        if arch == "topk":
            if self.cfg.rescale_acts_by_decoder_norm:
                hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
            k = int(self.cfg.k or 0)
            values, index = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
            return torch.zeros_like(hidden_pre).scatter(-1, index, values.relu())
        acts = hidden_pre.relu()
        if arch == "jumprelu":
            assert self.threshold is not None
            acts = acts * (hidden_pre > self.threshold).to(acts.dtype)
        return acts

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations [..., d_sae] of residual-stream vectors [..., d_in]."""
        return self.activate(self.pre_activation(x))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction [..., d_in]; with run-time normalisation pass the input `x` to undo it."""
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        out = f @ self.W_dec + self.b_dec
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if x is None:
                raise ValueError(f"decode of an SAE with normalize_activations={self.cfg.normalize_activations} "
                                 "needs the input x")
            _, a, b = self._norm_in(x.to(out.dtype))
            assert a is not None
            out = out / a if b is None else out * b + a
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    # -- helpers -----------------------------------------------------------------------------

    def unit_decoder(self) -> Tensor:
        """Decoder rows scaled to unit norm [d_sae, d_in] (what a latent writes, as a direction)."""
        w = self.W_dec.detach().float()
        return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def weights(self) -> dict[str, Tensor]:
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return {k: v.detach().contiguous() for k, v in out.items()}
