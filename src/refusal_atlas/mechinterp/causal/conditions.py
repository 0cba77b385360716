"""Conditions: does a condition (a role, an age, a purpose) move the representation, or only the output?

For nodes with condition rules, the projection onto the node's direction and the refusal rate under
each condition value, with bootstrap CIs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal.common import bootstrap_ci
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.mechinterp.scoring import refusal_flags

__all__ = ["condition_summary", "condition_table"]


def condition_table(
    lm: LoadedModel,
    directions: DirectionSet,
    rows: pd.DataFrame,
    *,
    layer: int,
    position: Position,
    settings: RunSettings = RunSettings(),
    node_of: Mapping[str, str] | None = None,
    refused: Sequence[bool] | np.ndarray | None = None,
    refusal_measure: str = "generated",
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """For every (direction node, condition) in `rows`: projection on the node's direction and refusal rate.

    `rows` is a prompt table with `prompt`, `node`, `condition` ("" = unconditioned) and
    optionally `expected`/`category`. `node_of` maps a row's node to the direction it is read
    against (e.g. its taxonomy branch); by default the row's own node. Refusals come from
    `refused` (e.g. an organism's adherence table or first-token scores; `refusal_measure` names
    which) or are generated here (marker detector on `settings.max_new_tokens` tokens).
    """
    if rows.empty:
        raise AtlasError("condition table: no prompts")
    df = rows.reset_index(drop=True).copy()
    if refused is not None:
        if len(refused) != len(df):
            raise AtlasError(f"condition table: {len(refused)} refusal flags for {len(df)} prompts")
        df["refused"] = np.asarray(refused, dtype=bool)
    else:
        refusal_measure = "generated"
    df["direction_node"] = df["node"].map(lambda n: (node_of or {}).get(n, n))
    df = df[df["direction_node"].isin(directions.nodes)].reset_index(drop=True)
    if df.empty:
        raise AtlasError("condition table: none of the prompts' nodes has a direction")
    acts = capture_activations(lm, list(df["prompt"]), layers=[layer], positions=[position],
                               batch_size=settings.batch_size, system=settings.system, progress=settings.progress)
    x = acts.at(layer, position)  # [n, d]
    units = {n: directions.unit(n, layer, position) for n in df["direction_node"].unique()}
    pooled = directions.unit(POOLED, layer, position)
    df["projection"] = [float(x[i] @ units[n]) for i, n in enumerate(df["direction_node"])]
    df["pooled_projection"] = (x @ pooled).numpy()
    if "refused" not in df:
        responses = generate(lm, list(df["prompt"]), max_new_tokens=settings.max_new_tokens,
                             batch_size=settings.batch_size, system=settings.system, progress=settings.progress,
                             desc="conditions")
        df["refused"] = refusal_flags(responses, list(df["prompt"]))[0]
    out = []
    keys = ["direction_node", "condition"]
    for (node, cond), g in df.groupby(keys, sort=True):
        lo, hi = bootstrap_ci(g["projection"], n_boot, seed)
        rlo, rhi = bootstrap_ci(g["refused"].astype(float), n_boot, seed)
        out.append({"node": node, "condition": cond or "(none)", "n": len(g),
                    "expected": ",".join(sorted(set(g["expected"]))) if "expected" in g else "",
                    "category": ",".join(sorted(set(g["category"]))) if "category" in g else "",
                    "projection": float(g["projection"].mean()), "projection_ci_low": lo, "projection_ci_high": hi,
                    "pooled_projection": float(g["pooled_projection"].mean()),
                    "refusal_rate": float(g["refused"].mean()), "refusal_ci_low": rlo, "refusal_ci_high": rhi})
    table = pd.DataFrame(out)
    base = table[table["condition"] == "(none)"].set_index("node")
    table["projection_delta"] = table["projection"] - table["node"].map(base["projection"])
    table["refusal_delta"] = table["refusal_rate"] - table["node"].map(base["refusal_rate"])
    table["refusal_measure"] = refusal_measure
    return table


def condition_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Across nodes, per condition category (permitted / restricted / ...): mean deltas with CIs."""
    t = table[table["condition"] != "(none)"].dropna(subset=["projection_delta"])
    rows = []
    for cat, g in t.groupby("category"):
        lo, hi = bootstrap_ci(g["projection_delta"])
        rlo, rhi = bootstrap_ci(g["refusal_delta"].dropna())
        rows.append({"category": cat, "n_node_conditions": len(g),
                     "projection_delta": float(g["projection_delta"].mean()),
                     "projection_delta_ci_low": lo, "projection_delta_ci_high": hi,
                     "refusal_delta": float(g["refusal_delta"].mean()),
                     "refusal_delta_ci_low": rlo, "refusal_delta_ci_high": rhi})
    return pd.DataFrame(rows, columns=["category", "n_node_conditions", "projection_delta", "projection_delta_ci_low",
                                       "projection_delta_ci_high", "refusal_delta", "refusal_delta_ci_low",
                                       "refusal_delta_ci_high"])
