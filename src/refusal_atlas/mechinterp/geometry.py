"""Geometry of the node directions: one direction, a cone, or many?

- `cosine_matrix`: pairwise cosines of node directions at one layer/position (and per layer).
- `spectrum`: singular values of the stacked *unit* node directions (not centred, so a component
  shared by every node shows up as the first one): participation ratio `(Σλ)² / Σλ²`, the
  entropy effective rank `exp(H(λ/Σλ))`, and the variance explained by the first component
  (Zhao et al. report an effective dimension ≈ 2 and 57–72 % for the first component).
- `node_subspace` / `principal_angles`: each node's top-k principal directions of its prompts'
  differences from the harmless mean (uncentred SVD, so the first one is close to the node's
  diff-of-means direction), and the principal angles between two nodes' subspaces
  (Wollschläger et al.: refusal can be a low-dimensional cone rather than one direction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.linalg import subspace_angles
from torch import Tensor

from refusal_atlas.lm.capture import Activations
from refusal_atlas.lm.positions import Position
from refusal_atlas.mechinterp.directions import DirectionSet, Groups


def cosine_matrix(vectors: Tensor) -> Tensor:
    """[K, d] -> [K, K] cosines."""
    u = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return u @ u.T


def cosine_matrices(ds: DirectionSet, position: Position, method: str = "diff_means",
                    nodes: Sequence[str] | None = None) -> Tensor:
    """[L, K, K] cosine matrix per layer."""
    return torch.stack([cosine_matrix(ds.stack(layer, position, method, nodes)) for layer in ds.layers])


def spectrum(vectors: Tensor) -> dict[str, float]:
    """Participation ratio, entropy effective rank and first-component share of unit directions."""
    u = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    lam = torch.linalg.svdvals(u.double()) ** 2
    total = lam.sum()
    p = lam / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {
        "participation_ratio": float(total**2 / (lam**2).sum()),
        "effective_rank": float(entropy.exp()),
        "first_component": float(p[0]),
        "n_directions": int(vectors.shape[0]),
    }


def geometry_table(ds: DirectionSet, position: Position, method: str = "diff_means") -> list[dict]:
    """One row per layer: cosine summary of the node directions and their spectrum."""
    rows = []
    k = len(ds.nodes)
    off = ~torch.eye(k, dtype=torch.bool)
    for layer in ds.layers:
        vecs = ds.stack(layer, position, method)
        cos = cosine_matrix(vecs)[off] if k > 1 else torch.tensor([float("nan")])
        row = {"layer": layer, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
               "max_cos": float(cos.max()), **spectrum(vecs)}
        if ds.noise.get(f"{method}/split_half_mean") is not None:
            sh = ds.noise[f"{method}/split_half_mean"][:k, ds.layer_index(layer), ds.position_index(position)]
            row["mean_split_half"] = float(sh.nanmean())
        rows.append(row)
    return rows


@torch.inference_mode()
def node_subspace(acts: Activations,
                  groups: Groups, node: str, layer: int, position: Position, k: int = 3) -> np.ndarray:
    """[d, k] orthonormal top-k directions of the node's prompts minus the harmless mean."""
    li, pi = acts.layer_index(layer), acts.position_index(position)
    x = acts.acts[:, li, pi].double()
    diffs = x[groups.nodes[node]] - x[groups.harmless].mean(0)
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    return vh[: min(k, vh.shape[0])].T.numpy()


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, ascending) between the column spaces of a and b."""
    return np.sort(np.degrees(subspace_angles(a, b)))


def principal_angle_matrix(acts: Activations,
                           groups: Groups, layer: int, position: Position, k: int = 3) -> dict[str, Any]:
    """{"nodes": ids, "angles": [K, K, k] degrees} between every pair of node subspaces."""
    ids = groups.node_ids
    subs = {n: node_subspace(acts, groups, n, layer, position, k) for n in ids}
    kk = min(s.shape[1] for s in subs.values())
    out = np.zeros((len(ids), len(ids), kk))
    for i, a in enumerate(ids):
        for j in range(i + 1, len(ids)):
            ang = principal_angles(subs[a][:, :kk], subs[ids[j]][:, :kk])
            out[i, j] = out[j, i] = ang
    return {"nodes": ids, "angles": out}
