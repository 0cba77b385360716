"""Cross-ablation: ablate node i's direction and measure refusal on every node j's prompts.

Also the pooled direction and each node's residual after the pooled direction is projected out,
plus the harmless KL: can the components of refusal be steered separately?
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal.common import TokenSpec, first_token_scores, marker_flags, token_ids
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.mechinterp.interventions import Intervention, ablation
from refusal_atlas.mechinterp.scoring import answered_mean, clean_logprobs, kl_from_logprobs, next_token_logprobs

__all__ = ["cross_ablation", "cross_ablation_summary", "cross_summary"]


def cross_ablation(
    lm: LoadedModel,
    directions: DirectionSet,
    eval_sets: Mapping[str, Sequence[str]],
    harmless: Sequence[str],
    tokens: TokenSpec,
    *,
    layer: int,
    position: Position,
    settings: RunSettings = RunSettings(),
    sources: Sequence[str] | None = None,
    methods: Sequence[str] = ("diff_means", "residual"),
    include_pooled: bool = True,
    generate_rates: bool = False,
    ablation_layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per (ablated source, method, target node): refusal on the target's prompts + harmless KL.
    Each direction is ablated in every layer, or in `ablation_layers`.

    The source "none" is the un-ablated baseline. Refusal is measured by the logit score (mean
    log-odds), the share of prompts whose greedy first token opens a refusal, and — with
    `generate_rates` — the marker detector's rate on `settings.max_new_tokens` generated tokens.
    """
    ids = token_ids(tokens)
    batch_size, system = settings.batch_size, settings.system
    targets = [t for t, p in eval_sets.items() if len(p)]
    if not targets:
        raise AtlasError("cross-ablation: no target node has evaluation prompts")
    flat = [p for t in targets for p in eval_sets[t]]
    owner = np.array([t for t in targets for _ in eval_sets[t]])
    nodes = [s for s in (sources if sources is not None else directions.nodes) if s in directions.nodes]
    jobs: list[tuple[str, str, Intervention | None]] = [("none", "none", None)]
    if include_pooled:
        jobs.append((POOLED, "diff_means", ablation(lm.model, directions.get(POOLED, layer, position),
                                                    ablation_layers)))
    for method in methods:
        for node in nodes:
            vec = directions.get(node, layer, position, method)
            if float(vec.norm()) > 0:
                jobs.append((node, method, ablation(lm.model, vec, ablation_layers)))
    clean = clean_logprobs(lm, harmless, batch_size=batch_size, system=system)[0]
    harmless_refused = np.isin(clean.argmax(-1).numpy(), ids)  # KL counts the harmless prompts the model answers
    rows = []
    for source, method, intervention in tqdm(jobs, desc="cross-ablate", unit="ablation",
                                             disable=not settings.progress, dynamic_ncols=True):
        odds, first = first_token_scores(lm, flat, ids, intervention, batch_size, system)
        marker = marker_flags(lm, flat, intervention, settings) if generate_rates else None
        if intervention is None:
            kl = 0.0
        else:
            kl = answered_mean(kl_from_logprobs(clean, next_token_logprobs(
                lm, harmless, intervention=intervention, batch_size=batch_size, system=system)), harmless_refused)
        for target in targets:
            m = owner == target
            rows.append({"source": source, "method": method, "target": target, "n": int(m.sum()),
                         "logit_score": float(odds[m].mean()), "first_token_refusal_rate": float(first[m].mean()),
                         "refusal_rate": float(marker[m].mean()) if marker is not None else np.nan,
                         "harmless_kl": kl, "layer": layer, "position": position_label(position),
                         "prompt_logit_scores": [float(v) for v in odds[m]]})
    df = pd.DataFrame(rows)
    base = df[df["source"] == "none"].set_index("target")
    for col in ("logit_score", "first_token_refusal_rate", "refusal_rate"):
        df[f"{col}_baseline"] = df["target"].map(base[col])
    df["self"] = df["source"] == df["target"]
    # per-prompt log-odds, in prompt order (the same order for every source): paired intervals need them
    df["prompt_logit_scores"] = df.pop("prompt_logit_scores")
    return df


def cross_ablation_summary(df: pd.DataFrame, value: str = "first_token_refusal_rate") -> pd.DataFrame:
    """Per source and method: refusal left on its own node vs on the other nodes (and the KL)."""
    rows = []
    for (source, method), g in df[df["source"] != "none"].groupby(["source", "method"], sort=False):
        own = g[g["target"] == source][value]
        other = g[g["target"] != source][value]
        rows.append({"source": source, "method": method, "own": float(own.mean()) if len(own) else np.nan,
                     "others": float(other.mean()) if len(other) else np.nan,
                     "all": float(g[value].mean()), "harmless_kl": float(g["harmless_kl"].iloc[0])})
    return pd.DataFrame(rows, columns=["source", "method", "own", "others", "all", "harmless_kl"])


def cross_summary(cross: pd.DataFrame, value: str = "first_token_refusal_rate") -> dict[str, object]:
    """Mean refusal on a node's own prompts vs on the other nodes' prompts when one node's direction is ablated."""
    if not {"source", "target", "method", value} <= set(cross.columns):
        return {"rows": len(cross)}
    t = cross[cross["method"] == "diff_means"]
    base = cross[cross["source"] == "none"].groupby("target")[value].mean()
    nodes = [n for n in t["source"].unique() if n not in ("none", POOLED)]
    own = [float(t[(t["source"] == n) & (t["target"] == n)][value].mean()) for n in nodes]
    other = [float(t[(t["source"] == n) & (t["target"] != n) & t["target"].isin(nodes)][value].mean()) for n in nodes]
    return {"rows": len(cross), "value": value, "baseline_mean": float(base.mean()) if len(base) else None,
            "own_node_after_mean": float(np.nanmean(own)) if own else None,
            "other_nodes_after_mean": float(np.nanmean(other)) if other else None}
