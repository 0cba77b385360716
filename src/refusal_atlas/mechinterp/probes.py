"""Per-node layer profiles: where is each node separable from harmless, and where is it identifiable?

- `auroc_profile`: for each node, a seeded train/test split of the node's prompts and of the
  harmless set; the diff-of-means direction is estimated on the train half only and the test
  prompts are scored by their projection on it. AUROC per (layer, position), computed for all
  layers and positions at once (Mann–Whitney U from ranks).
- `probe_accuracy`: a cross-validated multinomial logistic regression predicting *which* node a
  harmful prompt belongs to, per layer (and position) — where the category is detected, as
  opposed to where harmful-vs-harmless is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from refusal_atlas.lm.capture import Activations
from refusal_atlas.lm.positions import Position
from refusal_atlas.mechinterp.directions import Groups


def auroc_from_scores(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of positives vs negatives along axis 0 (ties count half), vectorised over the rest."""
    both = np.concatenate([pos, neg], axis=0)
    ranks = rankdata(both, axis=0)
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    u = ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _split(idx: torch.Tensor, frac: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = idx[torch.randperm(len(idx), generator=gen)]
    n_train = min(max(1, round(len(idx) * frac)), len(idx) - 1)
    return perm[:n_train], perm[n_train:]


@torch.inference_mode()
def auroc_profile(acts: Activations,
                  groups: Groups, *, train_frac: float = 0.5, seed: int = 0) -> dict[str, np.ndarray]:
    """{node: [L, P] held-out AUROC of the node vs harmless, by projection on a train-half direction}."""
    gen = torch.Generator().manual_seed(seed)
    h_train, h_test = _split(groups.harmless, train_frac, gen)
    x = acts.acts
    mu_h = x[h_train].mean(0)
    out = {}
    for node, idx in groups.nodes.items():
        n_train, n_test = _split(idx, train_frac, gen)
        direction = x[n_train].mean(0) - mu_h  # [L, P, d]
        pos = (x[n_test] * direction).sum(-1).numpy()  # [n, L, P]
        neg = (x[h_test] * direction).sum(-1).numpy()
        out[node] = auroc_from_scores(pos, neg)
    return out


def probe_accuracy(
    acts: Activations,
    nodes: Sequence[str],
    harmful: Sequence[bool],
    *,
    positions: Sequence[Position] | None = None,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 500,
) -> dict:
    """Cross-validated accuracy of a linear probe for node identity, per layer and position.

    Returns {"accuracy": [L, P] array (NaN where a position was not probed), "chance": majority
    rate, "n": prompts used, "classes": node ids}. Only harmful prompts of nodes with at least
    `folds` prompts take part (stratified folds need them).
    """

    labels = np.array(list(nodes), dtype=object)
    keep = np.array([bool(h) and bool(n) for n, h in zip(nodes, harmful, strict=True)])
    classes, counts = np.unique(labels[keep], return_counts=True)
    ok = set(classes[counts >= folds].tolist())
    keep &= np.array([n in ok for n in labels])
    n_layers, n_pos = acts.acts.shape[1], acts.acts.shape[2]
    acc = np.full((n_layers, n_pos), np.nan)
    result = {"accuracy": acc, "chance": float("nan"), "n": int(keep.sum()), "classes": sorted(ok)}
    if len(ok) < 2:
        return result
    y = labels[keep]
    _, cls_counts = np.unique(y, return_counts=True)
    result["chance"] = float(cls_counts.max() / cls_counts.sum())
    x = acts.acts[torch.as_tensor(np.flatnonzero(keep))]
    wanted = range(n_pos) if positions is None else [acts.position_index(p) for p in positions]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for li in range(n_layers):
        for pi in wanted:
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=0.1))
            acc[li, pi] = cross_val_score(model, x[:, li, pi].numpy(), y, cv=cv).mean()
    return result
