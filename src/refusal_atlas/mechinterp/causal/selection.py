"""Choosing one (layer, position) direction per node, the way Arditi et al. do.

For each candidate direction r (a node's difference of means at layer l, position p):
- bypass score: mean refusal log-odds on harmful validation prompts with r ablated everywhere
  (lower = ablating it removes refusal better);
- induce score: mean refusal log-odds on harmless validation prompts with the raw r added at
  layer l (higher = adding it makes the model refuse);
- KL: mean first-position KL(clean ‖ ablated) on the harmless validation prompts the model answers
  (capability cost; where it over-refuses, un-refusing is the ablation's intended effect — `kl_all`
  keeps every prompt).
Candidates are kept when induce > 0, KL < `kl_threshold` (0.1) and l < `max_layer_fraction`·L
(0.8); the kept one with the lowest bypass score wins. When none is kept, `choose` relaxes the filters
in a fixed order and only for candidates whose ablation still removes refusal (see its docstring).
Every score is reported, so a user can see how much the choice matters.

Ablation scope (`ablation_starts`): Arditi et al. ablate in every layer. Most of the harmless KL can
come from ablating the early layers, where the direction is small and does not yet carry the refusal
(measurements: docs/decisions.md, "Causal protocol"). So the
`scope_candidates` (3) candidates that pass the induce filter with the lowest bypass scores are also
scored ablated only from layer s on, for each s in `ablation_starts` (s ≤ l); these rows compete in
the same rule (`ablate_from`, 0 = every layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.mechinterp.directions import DirectionSet
from refusal_atlas.mechinterp.interventions import ablation, addition
from refusal_atlas.mechinterp.scoring import (
    RefusalTokens,
    answered_mean,
    clean_logprobs,
    kl_from_logprobs,
    next_token_logprobs,
    refusal_flags,
    refusal_logodds,
)


def candidate_layers(n_layers: int, available: Sequence[int] | None = None, *, quick: bool = False) -> list[int]:
    """The layers `run` and `organism test` select among: a coarse grid over 0.3-0.7·L plus, outside quick
    runs, every layer from 0.7·L up to Arditi et al.'s 0.8·L bound, where the best direction can sit off the
    coarse grid (docs/decisions.md, "Causal protocol"). `available`: the captured layers (default: all)."""
    available = list(range(n_layers)) if available is None else list(available)
    fractions = (0.4, 0.55, 0.7) if quick else (0.3, 0.4, 0.5, 0.6, 0.7)
    wanted = {min(available, key=lambda la: abs(la - f * n_layers)) for f in fractions}
    if not quick:
        wanted |= {la for la in available if 0.7 * n_layers <= la}
    ordered = sorted(wanted)
    return [la for la in ordered if la < 0.8 * n_layers] or ordered[:1]


def default_ablation_starts(n_layers: int) -> list[int]:
    """First layers of the narrower ablation scopes scored beside every-layer ablation: 0.4 / 0.55 / 0.67 · L."""
    return sorted({max(1, round(f * n_layers)) for f in (0.4, 0.55, 0.67)})


@dataclass
class Selection:
    """The chosen candidate for one node and the full scores table."""

    node: str
    layer: int
    position: Position
    passed_filters: bool
    scores: pd.DataFrame
    baseline: dict[str, float] = field(default_factory=dict)
    ablate_from: int = 0  # the first ablated layer (0: every layer)
    n_layers: int | None = None

    @property
    def ablation_layers(self) -> list[int] | None:
        """The layers to ablate the chosen direction in (None: every layer)."""
        if self.ablate_from == 0 or self.n_layers is None:
            return None
        return list(range(self.ablate_from, self.n_layers))

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "layer": self.layer, "position": position_label(self.position),
                "passed_filters": self.passed_filters, "baseline": self.baseline, "ablate_from": self.ablate_from}


def select_direction(
    lm: LoadedModel,
    directions: DirectionSet,
    node: str,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    tokens: RefusalTokens | Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[Position] | None = None,
    method: str = "diff_means",
    kl_threshold: float = 0.1,
    max_layer_fraction: float = 0.8,
    induce_threshold: float = 0.0,
    ablation_starts: Sequence[int] = (),
    scope_candidates: int = 3,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = True,
) -> Selection:
    """Score every (layer, position) candidate of `node` and pick one (see the module docstring)."""
    if not harmful_val or not harmless_val:
        raise AtlasError(f"select {node}: need harmful and harmless validation prompts")
    ids = tokens.ids if isinstance(tokens, RefusalTokens) else list(tokens)
    layer_list = list(layers) if layers is not None else list(directions.layers)
    pos_list = list(positions) if positions is not None else list(directions.positions)
    n_layers = lm.n_layers
    clean_harmless = clean_logprobs(lm, harmless_val, batch_size=batch_size, system=system)[0]
    base_harmful = refusal_logodds(next_token_logprobs(lm, harmful_val, batch_size=batch_size, system=system), ids)
    baseline = {"harmful": float(base_harmful.mean()), "harmless": float(refusal_logodds(clean_harmless, ids).mean())}
    harmless_refused = np.isin(clean_harmless.argmax(-1).numpy(), ids)  # greedy first token is a refusal token
    rows = []

    def score(vec: Tensor, layer: int, pos: Position, start: int, induce: float) -> None:
        abl = ablation(lm.model, vec, None if start == 0 else range(start, n_layers))
        bypass = refusal_logodds(
            next_token_logprobs(lm, harmful_val, intervention=abl, batch_size=batch_size, system=system), ids)
        kl_each = kl_from_logprobs(clean_harmless, next_token_logprobs(lm, harmless_val, intervention=abl,
                                                                       batch_size=batch_size, system=system))
        kl = answered_mean(kl_each, harmless_refused)
        reasons = []
        if induce <= induce_threshold:
            reasons.append("induce<=0")
        if kl >= kl_threshold:
            reasons.append(f"kl>={kl_threshold:g}")
        if layer >= max_layer_fraction * n_layers:
            reasons.append(f"layer>={max_layer_fraction:g}L")
        rows.append({"node": node, "layer": layer, "position": position_label(pos), "method": method,
                     "ablate_from": start, "bypass_score": float(bypass.mean()), "induce_score": induce,
                     "kl": kl, "kl_all": float(kl_each.mean()), "norm": float(vec.norm()),
                     "filtered": ";".join(reasons)})

    bar = tqdm(total=len(layer_list) * len(pos_list), desc=f"select {node}", unit="cand", disable=not progress,
               dynamic_ncols=True)
    vectors = {}
    for layer in layer_list:
        for pos in pos_list:
            vec = directions.get(node, layer, pos, method)
            if float(vec.norm()) > 0.0:
                vectors[layer, position_label(pos)] = (vec, pos)
                induce = float(refusal_logodds(next_token_logprobs(
                    lm, harmless_val, intervention=addition(lm.model, vec, layer), batch_size=batch_size,
                    system=system), ids).mean())
                score(vec, layer, pos, 0, induce)
            bar.update(1)
    # narrower scopes for the few candidates that could win: they pass the induce filter and remove the most
    everywhere = pd.DataFrame(rows)
    if ablation_starts and len(everywhere):
        contenders = everywhere[everywhere["induce_score"] > induce_threshold].nsmallest(scope_candidates,
                                                                                          "bypass_score")
        jobs = [(r, st) for r in contenders.itertuples() for st in sorted(set(ablation_starts)) if 0 < st <= r.layer]
        bar.total += len(jobs)
        for r, st in jobs:
            vec, pos = vectors[r.layer, r.position]
            score(vec, int(r.layer), pos, st, float(r.induce_score))
            bar.update(1)
    bar.close()
    if not rows:
        raise AtlasError(f"select {node}: every candidate direction is zero")
    scores = pd.DataFrame(rows)
    scores, layer, label, passed = choose(scores, kl_threshold)
    pos = pos_list[[position_label(p) for p in pos_list].index(label)]
    start = int(scores.loc[scores["chosen"], "ablate_from"].iloc[0])
    return Selection(node, layer, pos, passed, scores, baseline, ablate_from=start, n_layers=n_layers)


def choose(scores: pd.DataFrame, kl_threshold: float = 0.1, kl_cap: float = 1.0
           ) -> tuple[pd.DataFrame, int, str, bool]:
    """Apply the choice rule to a scores table: (table with `chosen` and `tier`, layer, position, passed).

    Tier 1: every filter passed, lowest bypass score. When nothing passes, the filters are relaxed
    in order rather than taking the global minimum (which is usually a direction whose ablation
    breaks the model — a huge KL also drives the refusal score down), and a relaxed choice must still
    remove refusal (bypass score < 0: the refusal tokens are no longer favoured on average):
    tier 2 drops the induce filter (KL < `kl_threshold`, lowest bypass); tier 3 also allows a KL up
    to `kl_cap` and takes the lowest KL. Tier 4, when no candidate removes refusal without breaking
    the model, takes the lowest KL among every-layer ablations (a narrower scope always has a lower
    KL, whether or not it still removes refusal). Every tier keeps the layer filter where it can. The
    tier is reported so no relaxed choice passes for a clean one.
    """
    scores = scores.copy()
    if "ablate_from" not in scores:
        scores["ablate_from"] = 0
    layer_ok = ~scores["filtered"].str.contains("L", regex=False)
    if not layer_ok.any():
        layer_ok = pd.Series(True, index=scores.index)
    removes = scores["bypass_score"] < 0
    everywhere = scores["ablate_from"] == 0
    tiers = [
        (1, scores["filtered"] == "", ["bypass_score", "kl"]),
        (2, layer_ok & removes & (scores["kl"] < kl_threshold), ["bypass_score", "kl"]),
        (3, layer_ok & removes & (scores["kl"] < kl_cap), ["kl", "bypass_score"]),
        (4, (layer_ok & everywhere) if (layer_ok & everywhere).any() else layer_ok, ["kl", "bypass_score"]),
    ]
    chosen_tier, best = next((t, scores[m].sort_values(o).iloc[0]) for t, m, o in tiers if m.any())
    scores["chosen"] = ((scores["layer"] == best["layer"]) & (scores["position"] == best["position"])
                        & (scores["ablate_from"] == best["ablate_from"]))
    scores["tier"] = chosen_tier
    return scores, int(best["layer"]), str(best["position"]), chosen_tier == 1


def choose_coefficient(
    lm: LoadedModel,
    vector: Tensor,
    layer: int,
    harmless_val: Sequence[str],
    tokens: RefusalTokens | Sequence[int],
    *,
    coeffs: Sequence[float] = (1.0, 1.5, 2.0, 3.0),
    target: float = 0.8,
    max_new_tokens: int = 0,
    batch_size: int = 16,
    system: str | None = None,
) -> tuple[float, pd.DataFrame]:
    """The smallest activation-addition coefficient that makes at least `target` of the harmless
    validation prompts refuse (else the one with the highest rate), and the dose table.

    Refusal is the greedy first token, or with `max_new_tokens` > 0 the marker detector on that many
    generated tokens — the measure the reported induced-refusal rate uses (a first refusal token can
    still be followed by an answer). Doses are tried in increasing order and the search stops at the
    first that reaches the target. Why a dose at all: Arditi et al. add the raw difference of means
    (coefficient 1); a model whose refusal is spread over several layers can need more. Chosen on
    validation prompts only, so the rate reported on evaluation prompts is not tuned on them.
    """
    ids = tokens.ids if isinstance(tokens, RefusalTokens) else list(tokens)
    clean = clean_logprobs(lm, harmless_val, batch_size=batch_size, system=system)[0]
    rows = []
    for c in sorted(coeffs):
        add = addition(lm.model, vector, layer, coeff=c)
        logp = next_token_logprobs(lm, harmless_val, intervention=add, batch_size=batch_size, system=system)
        row = {"coefficient": float(c), "layer": layer, "n": len(harmless_val),
               "first_token_refusal_rate": float(np.isin(logp.argmax(-1).numpy(), ids).mean()),
               "logit_score": float(refusal_logodds(logp, ids).mean()),
               "kl_vs_clean": float(kl_from_logprobs(clean, logp).mean())}
        if max_new_tokens > 0:
            replies = generate(lm, harmless_val, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system,
                               hooks=add, progress=False)
            row["refusal_rate"] = float(refusal_flags(replies, harmless_val)[0].mean())
        rows.append(row)
        if row.get("refusal_rate", row["first_token_refusal_rate"]) >= target:
            break
    table = pd.DataFrame(rows)
    measure = "refusal_rate" if max_new_tokens > 0 else "first_token_refusal_rate"
    reached = table[table[measure] >= target]
    best = reached.iloc[0] if len(reached) else table.sort_values([measure, "coefficient"],
                                                                   ascending=[False, True]).iloc[0]
    table["measure"] = measure
    table["chosen"] = table["coefficient"] == best["coefficient"]
    return float(best["coefficient"]), table


def select_all(
    lm: LoadedModel,
    directions: DirectionSet,
    nodes: Sequence[str],
    harmful_val: dict[str, Sequence[str]],
    harmless_val: Sequence[str],
    tokens: RefusalTokens | Sequence[int],
    **kwargs: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(chosen pair per node, every candidate's scores) for several nodes."""
    chosen, tables = [], []
    for node in nodes:
        prompts = harmful_val.get(node) or []
        if not prompts:
            continue
        sel = select_direction(lm, directions, node, prompts, harmless_val, tokens, **kwargs)
        chosen.append(sel.to_dict())
        tables.append(sel.scores)
    if not chosen:
        raise AtlasError("no node had harmful validation prompts to select a direction with")
    return pd.DataFrame(chosen), pd.concat(tables, ignore_index=True)


__all__ = ["Selection", "choose_coefficient", "select_all", "select_direction"]
