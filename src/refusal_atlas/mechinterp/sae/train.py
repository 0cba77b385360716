"""A small TopK SAE trainer (Gao et al. 2024): unit-norm decoder rows, AuxK loss for dead latents.

Training sees activations scaled by one constant so that their mean squared norm is d_in (the
learning rate then transfers across models); the scale is folded back into b_enc and b_dec before
saving, so the saved SAE reads raw residual-stream vectors (normalize_activations = none) and its
latents are in raw units along unit decoder rows. Determinism: the initialisation and every epoch's
row order come from `seed`; a step is a pure function of its batch and the state, so a run resumed
from a checkpoint (which records the step) ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_json
from refusal_atlas.mechinterp.sae.data import ActivationSource
from refusal_atlas.mechinterp.sae.format import save_sae
from refusal_atlas.mechinterp.sae.model import SAEConfig, SparseAutoencoder

CHECKPOINT = "checkpoint.safetensors"
TRAINING_JSON = "training.json"


@dataclass
class TrainSettings:
    width: int = 2048
    k: int = 32
    epochs: int = 5
    batch_size: int = 512
    lr: float = 2e-3
    seed: int = 0
    aux_k: int = 256  # latents the AuxK loss may use to model the residual
    aux_coeff: float = 1 / 32
    dead_tokens: int = 20_000  # a latent silent for this many training rows counts as dead
    checkpoint_every: int = 200  # steps
    max_steps: int | None = None  # stop early (tests of resumption, quick runs)


def _init(d_in: int, settings: TrainSettings, mean: Tensor) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(settings.seed)
    w_dec = torch.randn(settings.width, d_in, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    # tied initialisation: each latent starts by reading the direction it writes
    return {"W_enc": w_dec.T.clone().contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(settings.width),
            "b_dec": mean.clone()}


class _State:
    def __init__(self, params: dict[str, Tensor], settings: TrainSettings) -> None:
        self.params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=settings.lr)
        self.since_fired = torch.zeros(settings.width, dtype=torch.long)
        self.step = 0

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        tensors = {f"param.{k}": v.detach() for k, v in self.params.items()}
        for i, p in enumerate(self.params.values()):
            state = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    tensors[f"adam.{i}.{key}"] = state[key]
            if "step" in state:
                tensors[f"adam.{i}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
        tensors["since_fired"] = self.since_fired

        header = {"step": str(self.step), "meta": json.dumps(meta)}
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                 metadata=header))

    def load(self, path: Path, meta: dict[str, Any]) -> None:

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        except (SafetensorError, OSError) as exc:
            raise AtlasError(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from exc
        if json.loads(header.get("meta", "{}")) != meta:
            raise AtlasError(f"{path}: checkpoint from different data or settings; delete it or use another folder")
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(tensors[f"param.{k}"])
        for i, p in enumerate(self.params.values()):
            if f"adam.{i}.exp_avg" in tensors:
                self.opt.state[p] = {"step": tensors[f"adam.{i}.step"].reshape(()),
                                     "exp_avg": tensors[f"adam.{i}.exp_avg"].clone(),
                                     "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].clone()}
        self.since_fired = tensors["since_fired"].clone()
        self.step = int(header["step"])


def _topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    values, index = torch.topk(pre, k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, index, values.relu()), index


def _step(state: _State, x: Tensor, settings: TrainSettings) -> tuple[float, float, int]:
    """One Adam step; returns (batch FVU, batch L0, dead latents)."""
    p = state.params
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f, _ = _topk(pre, settings.k)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    err = x - x_hat
    total_var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    fvu = err.pow(2).sum() / total_var
    loss = fvu
    fired = (f > 0).any(0)
    state.since_fired = torch.where(fired, 0, state.since_fired + x.shape[0])
    dead = state.since_fired >= settings.dead_tokens
    n_dead = int(dead.sum())
    if n_dead and settings.aux_coeff > 0:
        # AuxK: the top dead latents model what the live ones failed to reconstruct, which hands
        # them gradient again and revives them.
        aux_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        f_aux, _ = _topk(aux_pre, min(settings.aux_k, n_dead))
        f_aux = torch.nan_to_num(f_aux, neginf=0.0)
        residual = err.detach()
        aux = (residual - f_aux @ p["W_dec"]).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = loss + settings.aux_coeff * torch.nan_to_num(aux, nan=0.0)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        w, g = p["W_dec"], p["W_dec"].grad
        if g is not None:  # drop the gradient part that would only change the (fixed) row norms
            g -= (g * w).sum(-1, keepdim=True) * w
    state.opt.step()
    with torch.no_grad():
        p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    state.step += 1
    return float(fvu.detach()), float((f > 0).sum(-1).float().mean()), n_dead


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, source: ActivationSource, batch_size: int = 4096) -> dict[str, float]:
    """FVU, mean L0 and the share of latents that never fire, over every row of `source`."""
    err_sq = 0.0
    sum_x = torch.zeros(source.d_in, dtype=torch.float64)
    sum_sq = 0.0
    n = 0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for chunk in source.chunks(None):
        for x in chunk.split(batch_size):
            f = sae.encode(x)
            err_sq += float((x - sae.decode(f, x)).double().pow(2).sum())
            sum_x += x.double().sum(0)
            sum_sq += float(x.double().pow(2).sum())
            l0 += float((f > 0).sum())
            fired |= (f > 0).any(0)
            n += x.shape[0]
    total_var = sum_sq - float(sum_x.pow(2).sum()) / max(n, 1)
    return {"fvu": err_sq / max(total_var, 1e-12), "l0": l0 / max(n, 1),
            "dead_fraction": float((~fired).float().mean()), "n_rows": float(n)}


def train_sae(
    source: ActivationSource,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train a TopK SAE on `source`, save it in SAELens format into `out_dir`, return it and its metrics.

    A `checkpoint.safetensors` in `out_dir` from the same data and settings is resumed from.
    """
    s = settings or TrainSettings()
    if not 0 < s.k <= s.width:
        raise AtlasError(f"k={s.k} must be between 1 and the width {s.width}")
    if source.n_rows < s.batch_size:
        raise AtlasError(f"{source.path}: {source.n_rows} activation rows, fewer than one batch of {s.batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sample = source.sample(min(source.n_rows, 20_000))
    scale = float((source.d_in / sample.pow(2).sum(-1).mean().clamp_min(1e-12)).sqrt())
    state = _State(_init(source.d_in, s, sample.mean(0) * scale), s)
    run_key = {"settings": {k: v for k, v in asdict(s).items() if k not in ("max_steps", "checkpoint_every")},
               "n_rows": source.n_rows, "d_in": source.d_in, "layer": source.layer, "path": str(source.path),
               "scale": round(scale, 6)}
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state.load(ckpt, run_key)
    steps_per_epoch = source.n_rows // s.batch_size
    total = steps_per_epoch * s.epochs if s.max_steps is None else min(s.max_steps, steps_per_epoch * s.epochs)
    bar = tqdm(total=total, initial=min(state.step, total), desc="sae train", unit="step",
               disable=not progress, dynamic_ncols=True)
    step = 0
    fvu = l0 = float("nan")
    finished = True
    for epoch in range(s.epochs):
        for x in source.batches(s.batch_size, seed=s.seed * 1_000 + epoch):
            if step >= total:
                finished = s.max_steps is None
                break
            step += 1
            if step <= state.step:  # done before the checkpoint: skip, keeping the data order
                continue
            fvu, l0, dead = _step(state, x * scale, s)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(fvu=f"{fvu:.3f}", l0=f"{l0:.1f}", dead=dead)
            if step % s.checkpoint_every == 0:
                state.save(ckpt, run_key)
    bar.close()
    state.save(ckpt, run_key)
    p = {k: v.detach() for k, v in state.params.items()}
    weights = {"W_enc": p["W_enc"], "W_dec": p["W_dec"], "b_enc": p["b_enc"] / scale, "b_dec": p["b_dec"] / scale}
    meta = {"hook_layer": source.layer, "hook_name": f"blocks.{source.layer}.hook_resid_post",
            "trainer": "refusal_atlas topk", **(metadata or {})}
    sae = SparseAutoencoder(SAEConfig("topk", source.d_in, s.width, k=s.k, metadata=meta), weights)
    save_sae(sae, out)
    metrics = {**evaluate(sae, source), "steps": state.step, "tokens_seen": state.step * s.batch_size,
               "seconds": time.perf_counter() - started, "activation_scale": scale, "finished": finished}
    atomic_write_json(out / TRAINING_JSON, {"settings": asdict(s), "metrics": metrics, "source": str(source.path)})
    if finished and s.max_steps is None:
        ckpt.unlink(missing_ok=True)  # a finished run needs no resume point
    return sae, metrics
