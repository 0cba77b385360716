"""Steering: add a node's direction to harmless prompts, layer by layer, and measure induced refusal."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal.common import TokenSpec, first_token_scores, marker_flags, token_ids
from refusal_atlas.mechinterp.directions import DirectionSet
from refusal_atlas.mechinterp.interventions import addition

__all__ = ["steering"]


def steering(
    lm: LoadedModel,
    directions: DirectionSet,
    nodes: Sequence[str],
    harmless: Sequence[str],
    tokens: TokenSpec,
    *,
    layers: Sequence[int],
    position: Position,
    settings: RunSettings = RunSettings(),
    coeffs: Sequence[float] = (1.0,),
    method: str = "diff_means",
    at: str = "output",
    generate_rates: bool = True,
) -> pd.DataFrame:
    """Add each node's direction (natural norm × coeff) at each layer on harmless prompts → induced refusal."""
    ids = token_ids(tokens)
    batch_size, system = settings.batch_size, settings.system
    jobs = [(n, layer, c) for n in nodes for layer in layers for c in coeffs]
    base_odds, base_first = first_token_scores(lm, harmless, ids, None, batch_size, system)
    rows = []
    for node, layer, coeff in tqdm(jobs, desc="steer", unit="run", disable=not settings.progress,
                                   dynamic_ncols=True):
        vec = directions.get(node, layer, position, method)
        add = addition(lm.model, vec, layer, coeff=coeff, at=at)
        odds, first = first_token_scores(lm, harmless, ids, add, batch_size, system)
        marker = marker_flags(lm, harmless, add, settings) if generate_rates else None
        rows.append({"node": node, "layer": layer, "coeff": coeff, "position": position_label(position),
                     "method": method, "n": len(harmless), "norm": float(vec.norm()),
                     "logit_score": float(odds.mean()), "logit_score_baseline": float(base_odds.mean()),
                     "first_token_refusal_rate": float(first.mean()),
                     "first_token_refusal_rate_baseline": float(base_first.mean()),
                     "induced_refusal_rate": float(marker.mean()) if marker is not None else np.nan})
    return pd.DataFrame(rows)
