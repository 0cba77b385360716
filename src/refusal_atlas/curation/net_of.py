"""Texts net of another column: the part of each text's embedding that another text does not predict.

A refusal usually echoes its request ("I can't help with making a pipe bomb"), so a sentence encoder places
replies by topic, and clustering replies groups them as clustering their prompts would. Made net of the
prompt, a reply keeps what the prompt does not predict: how the model refused, not what it refused. The
prediction is a ridge regression of the reply vectors on the prompt vectors fitted over the corpus (with
intercepts; both centred), the residual is unit-normalised and clustered as any embedding would be.

The penalty is `lam · n` (n the rows fitted), i.e. `lam` on the covariance scale, so the shrinkage does not
change with the corpus size. With 384-d vectors and a few hundred rows an unpenalised fit would interpolate
(n < d) and leave nothing; too strong a penalty removes nothing. Planted measurements behind the default
are in docs/decisions.md ("Clustering replies net of their prompts").

What this also removes: any wording that depends on the request linearly (a node-specific refusal whose
label the request implies) is weakened with the topic; the residual keeps what varies *within* a topic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refusal_atlas.curation.embed_cache import quantise
from refusal_atlas.errors import AtlasError

__all__ = ["DEFAULT_LAMBDA", "MAX_FIT_ROWS", "NetOf", "net_of"]

DEFAULT_LAMBDA = 0.05
MAX_FIT_ROWS = 20_000  # the regression has d² parameters; a seeded sample this size fixes them (scale)
_BLOCK = 8192
_NOTHING_LEFT = 1e-3  # residual norm below which a text counts as fully predicted (float16 inputs: ~1e-3 steps)


@dataclass(frozen=True)
class NetOf:
    """The residual vectors and how much of the text's variance the other column explained."""

    vectors: np.ndarray  # (n, d) float32 unit vectors, float16-quantised like every embedding
    explained: float  # share of the (centred) text vectors' variance the fit predicts, over all rows
    lam: float
    fitted_rows: int
    nothing_left: int = 0  # rows whose residual was empty (given the shared direction of the mean text)

    def describe(self, column: str) -> dict:
        return {"column": column, "lambda": self.lam, "explained_variance": round(self.explained, 4),
                "fitted_rows": self.fitted_rows, "rows_with_nothing_left": self.nothing_left,
                "rule": "ridge of the text vectors on the column's vectors (penalty lambda x rows); the residual "
                        "is clustered"}


def net_of(x: np.ndarray, given: np.ndarray, *, lam: float = DEFAULT_LAMBDA, max_fit: int = MAX_FIT_ROWS,
           seed: int = 0) -> NetOf:
    """`x` (n, d) net of `given` (n, e): residuals of a ridge fit, unit-normalised and quantised."""
    x = np.asarray(x, dtype=np.float32)
    given = np.asarray(given, dtype=np.float32)
    if x.ndim != 2 or given.ndim != 2 or len(x) != len(given):
        raise AtlasError(f"net_of: {x.shape} texts and {given.shape} given vectors do not pair up")
    if lam <= 0:
        raise AtlasError(f"net_of: lambda must be > 0 (got {lam}); without a penalty a small corpus is interpolated")
    n = len(x)
    fit = (np.sort(np.random.default_rng(seed).choice(n, size=max_fit, replace=False))
           if n > max_fit else np.arange(n))
    g, t = given[fit].astype(np.float64), x[fit].astype(np.float64)
    g_mean, t_mean = g.mean(0), t.mean(0)
    gc, tc = g - g_mean, t - t_mean
    penalty = lam * len(fit) * np.eye(gc.shape[1])
    weights = np.linalg.solve(gc.T @ gc + penalty, gc.T @ tc)
    out = np.empty_like(x)
    total = explained = 0.0
    # a text with nothing left (every reply the same text, so each equals the mean) has a residual of rounding
    # noise, whose direction is arbitrary: such rows share one direction (the mean text's), so they group
    # together and deterministically. Inputs are unit vectors; distinct texts leave residuals far above this.
    mean_direction = t_mean / (np.linalg.norm(t_mean) or 1.0)
    nothing_left = 0
    for start in range(0, n, _BLOCK):
        block = slice(start, start + _BLOCK)
        centred = x[block].astype(np.float64) - t_mean
        residual = centred - (given[block].astype(np.float64) - g_mean) @ weights
        total += float((centred**2).sum())
        explained += float((centred**2).sum() - (residual**2).sum())
        norms = np.linalg.norm(residual, axis=1, keepdims=True)
        empty = norms[:, 0] < _NOTHING_LEFT
        nothing_left += int(empty.sum())
        residual[empty] = mean_direction
        norms[empty] = 1.0
        out[block] = residual / norms
    return NetOf(quantise(out), explained / total if total > 0 else 0.0, lam, len(fit), nothing_left)
