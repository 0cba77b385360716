"""Where a component acts: remove what a window of blocks writes along a node's direction, measure its refusal.

Why not steering alone: adding a direction at layer l induces refusal wherever later blocks read it,
so the layers where addition works say where the direction is *read*, not which blocks *compute*
it. Here each window of consecutive blocks has the node's direction projected out of its residual
writes only (the outputs of attention-out and MLP-down, `interventions.residual_writers`), while the
stream itself and every other block are left alone. A window whose writes carry the node's refusal
lowers that node's refusal when removed; a window that only passes the direction along does not.
One more row per node removes the writes of every block (the whole effect the scan divides up).

The direction is the node's difference of means at a late layer (`scan_layer`), where everything
the model reads out has been written: a band that writes refusal early or late is then measured
against the same vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output, replace_hidden
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal.common import TokenSpec, baseline_scores, first_token_scores, token_ids
from refusal_atlas.mechinterp.directions import DirectionSet
from refusal_atlas.mechinterp.interventions import Intervention, project_out, residual_writers, unit

__all__ = ["band_scan", "block_windows", "scan_layer", "write_ablation"]

ALL_BLOCKS = "all"
WINDOW = "window"


def block_windows(n_blocks: int, n_windows: int = 10) -> list[tuple[int, int]]:
    """Consecutive, non-overlapping windows [lo, hi] (inclusive) of about n_blocks / n_windows blocks each."""
    if n_blocks < 1:
        raise AtlasError("band scan: the model has no decoder blocks")
    width = max(1, math.ceil(n_blocks / max(1, n_windows)))
    return [(lo, min(lo + width, n_blocks) - 1) for lo in range(0, n_blocks, width)]


def scan_layer(n_layers: int, available: Sequence[int]) -> int:
    """The deepest captured layer below the last block (whose output is the unembedding's input only)."""
    below = [la for la in available if la <= n_layers - 2]
    if not below:
        raise AtlasError(f"band scan: no captured layer below {n_layers - 1}; capture deeper layers")
    return max(below)


def write_ablation(model: nn.Module, direction: Tensor, blocks: Sequence[int]) -> Intervention:
    """Project `direction` out of what `blocks` write into the residual stream (their write points' outputs)."""
    r = unit(direction)
    n = len(decoder_blocks(model))
    chosen = sorted({int(b) for b in blocks})
    bad = [b for b in chosen if not 0 <= b < n]
    if bad:
        raise AtlasError(f"block(s) {bad} out of range: the model has {n} decoder blocks (0..{n - 1})")
    points = residual_writers(model).write_points

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return replace_hidden(output, project_out(hidden_from_output(output), r))

    def install() -> list[RemovableHandle]:
        return [p.register_forward_hook(hook, prepend=True) for b in chosen for p in points[b]]

    return Intervention(install, f"remove writes of blocks {chosen[0]}-{chosen[-1]}" if chosen else "none")


def band_scan(
    lm: LoadedModel,
    directions: DirectionSet,
    eval_sets: Mapping[str, Sequence[str]],
    tokens: TokenSpec,
    *,
    position: Position,
    layer: int | None = None,
    n_windows: int = 10,
    settings: RunSettings = RunSettings(),
    baselines: Mapping[str, tuple[float, float, Sequence[float]]] | None = None,
) -> pd.DataFrame:
    """One row per (node, window): first-token refusal and mean refusal log-odds on the node's own prompts with
    the node's direction removed from the window's writes; `kind` "all" removes every block's writes.
    `baselines`: {node: (first-token refusal rate, mean log-odds, per-prompt log-odds)} already measured on the
    same prompts with the same tokens (the cross-ablation's "none" rows), so they are not run again. Every row
    keeps its per-prompt log-odds and the baseline's, in prompt order, for paired intervals."""
    ids = token_ids(tokens)
    n_blocks = len(decoder_blocks(lm.model))
    at = scan_layer(lm.n_layers, directions.layers) if layer is None else int(layer)
    windows = [(WINDOW, lo, hi) for lo, hi in block_windows(n_blocks, n_windows)] + [(ALL_BLOCKS, 0, n_blocks - 1)]
    nodes = [n for n, p in eval_sets.items() if len(p) and n in directions.nodes]
    rows: list[dict[str, Any]] = []
    known = dict(baselines or {})
    bar = tqdm(total=sum(len(windows) + (n not in known) for n in nodes), desc="band scan", unit="run",
               disable=not settings.progress, dynamic_ncols=True)
    for node in nodes:
        prompts = list(eval_sets[node])
        vec = directions.get(node, at, position)
        if node not in known:
            known[node] = baseline_scores(lm, prompts, ids, settings)
            bar.update(1)
        base_first, base_odds, base_prompts = known[node]
        for kind, lo, hi in windows:
            odds, first = first_token_scores(lm, prompts, ids, write_ablation(lm.model, vec, range(lo, hi + 1)),
                                             settings.batch_size, settings.system)
            rows.append({"node": node, "kind": kind, "block_lo": lo, "block_hi": hi, "scan_layer": at,
                         "position": position_label(position), "n": len(prompts),
                         "first_token_refusal_rate": float(np.mean(first)),
                         "first_token_refusal_rate_baseline": float(base_first),
                         "logit_score": float(np.mean(odds)), "logit_score_baseline": float(base_odds),
                         "prompt_logit_scores": [float(v) for v in odds],
                         "prompt_logit_scores_baseline": [float(v) for v in base_prompts]})
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows, columns=["node", "kind", "block_lo", "block_hi", "scan_layer", "position", "n",
                                       "first_token_refusal_rate", "first_token_refusal_rate_baseline",
                                       "logit_score", "logit_score_baseline", "prompt_logit_scores",
                                       "prompt_logit_scores_baseline"])
