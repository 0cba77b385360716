"""Where a component acts, by model diffing: restore one window of blocks to the model it was fine-tuned from.

Why not directions alone: a node's difference of means mixes what the node is about (its topic, which
every block from the embeddings on writes) with the refusal decision, and late blocks write the refusal's
output for every node alike. Removing a direction from a window's writes therefore lowers refusal
wherever the topic or the shared output is written, not where the node's refusal is computed; on the
separable organism that scan placed both planted components in the last blocks (docs/decisions.md,
"Verdicts and validation"). Where the model a chat model was fine-tuned from is at hand (always, for an
organism), the blocks that compute a node's refusal are those whose fine-tuned weights it needs: set one
window of blocks back to the reference model's weights, keep every other block, and measure the node's
refusal on its own prompts. A window whose weights carry the refusal lowers it; a window that was not
changed, or whose change serves something else, does not.

Every row keeps the per-prompt refusal log-odds (and the baseline's) in prompt order, for paired intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from refusal_atlas.lm.blocks import decoder_blocks, restored_blocks
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal.bands import block_windows
from refusal_atlas.mechinterp.causal.common import TokenSpec, baseline_scores, first_token_scores, token_ids
from refusal_atlas.mechinterp.causal.files import RESTORATION

__all__ = ["restoration_scan"]


def restoration_scan(
    lm: LoadedModel,
    reference: Mapping[int, Mapping[str, Tensor]],
    eval_sets: Mapping[str, Sequence[str]],
    tokens: TokenSpec,
    *,
    reference_name: str = "",
    n_windows: int = 10,
    settings: RunSettings = RunSettings(),
    baselines: Mapping[str, tuple[float, float, Sequence[float]]] | None = None,
) -> pd.DataFrame:
    """One row per (node, window of blocks): refusal on the node's own prompts with that window's weights set
    to `reference`'s (block index -> state dict, e.g. `lm.blocks.block_states(reference_model)`).
    `baselines`: {node: (first-token refusal rate, mean log-odds, per-prompt log-odds)} already measured on the
    same prompts with the same tokens, so they are not run again."""
    ids = token_ids(tokens)
    windows = block_windows(len(decoder_blocks(lm.model)), n_windows)
    nodes = [n for n, p in eval_sets.items() if len(p)]
    known = dict(baselines or {})
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=sum(len(windows) + (n not in known) for n in nodes), desc="restoration scan", unit="run",
               disable=not settings.progress, dynamic_ncols=True)
    for node in nodes:
        prompts = list(eval_sets[node])
        if node not in known:
            known[node] = baseline_scores(lm, prompts, ids, settings)
            bar.update(1)
        base_first, base_odds, base_prompts = known[node]
        for lo, hi in windows:
            with restored_blocks(lm.model, reference, range(lo, hi + 1)):
                odds, first = first_token_scores(lm, prompts, ids, None, settings.batch_size, settings.system)
            rows.append({"node": node, "block_lo": lo, "block_hi": hi, "n": len(prompts),
                         "first_token_refusal_rate": float(np.mean(first)),
                         "first_token_refusal_rate_baseline": float(base_first),
                         "logit_score": float(np.mean(odds)), "logit_score_baseline": float(base_odds),
                         "reference": reference_name, "prompt_logit_scores": [float(v) for v in odds],
                         "prompt_logit_scores_baseline": [float(v) for v in base_prompts]})
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows, columns=list(RESTORATION.columns))
