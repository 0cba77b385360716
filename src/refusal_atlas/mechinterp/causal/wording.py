"""Wording vs detection: where is a category detected, and where is its refusal worded?

Per layer, how well a linear probe tells the nodes apart (detection) beside how strongly each
direction promotes refusal-opening tokens through the logit lens (wording).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.mechinterp.causal.inputs import DirectionPrompts
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.mechinterp.logit_lens import token_set_score, wording_tokens
from refusal_atlas.mechinterp.probes import probe_accuracy

__all__ = ["wording_vs_detection"]


def wording_vs_detection(
    lm: LoadedModel,
    directions: DirectionSet,
    prompts: DirectionPrompts,
    refusal_ids: Sequence[int],
    *,
    position: Position,
    nodes: Sequence[str] | None = None,
    wordings: Mapping[str, str] | None = None,
    shared_wording: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Per layer: node-identity probe accuracy (detection) and refusal-token promotion (wording).

    With `wordings` ({node: its refusal text}, e.g. from an organism), also how strongly each
    node's direction promotes the tokens of its *own* node-specific wording, against the mean over
    the other nodes' wordings (positive = the direction carries the node's wording).
    """
    acts = prompts.acts
    probe = probe_accuracy(acts, prompts.nodes, prompts.harmful, positions=[position], seed=seed)
    pi = acts.position_index(position)
    node_list = [n for n in (nodes or directions.nodes) if n in directions.nodes]
    own_tokens = {n: wording_tokens(lm, wordings[n], shared_wording) for n in node_list
                  if wordings and n in wordings and wordings[n] != shared_wording}
    rows = []
    for li, layer in enumerate(acts.layers):
        if layer not in directions.layers:
            continue
        refusal_z = []
        own_z = []
        for n in node_list:
            vec = directions.get(n, layer, position)
            if float(vec.norm()) == 0:
                continue
            refusal_z.append(token_set_score(lm, vec, refusal_ids))
            if own_tokens.get(n):
                others = [t for m, ts in own_tokens.items() if m != n for t in ts if t not in own_tokens[n]]
                own_z.append(token_set_score(lm, vec, own_tokens[n]) - token_set_score(lm, vec, sorted(set(others)))
                             if others else token_set_score(lm, vec, own_tokens[n]))
        pooled = directions.get(POOLED, layer, position)
        rows.append({"layer": layer, "position": position_label(position),
                     "probe_accuracy": float(probe["accuracy"][li, pi]), "probe_chance": probe["chance"],
                     "refusal_token_z_mean": float(np.nanmean(refusal_z)) if refusal_z else np.nan,
                     "pooled_refusal_token_z": token_set_score(lm, pooled, refusal_ids),
                     "own_wording_z_mean": float(np.mean(own_z)) if own_z else np.nan,
                     "n_nodes": len(refusal_z)})
    return pd.DataFrame(rows)
