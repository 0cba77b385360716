"""The pooled direction's headline test (ablation and addition), its stability, and the refusal cone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal.common import TokenSpec, first_token_scores, marker_flags, token_ids
from refusal_atlas.mechinterp.causal.inputs import DirectionPrompts
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet, directions_from_means, group_means
from refusal_atlas.mechinterp.interventions import ablation, addition
from refusal_atlas.mechinterp.noise import bootstrap_weights
from refusal_atlas.mechinterp.scoring import answered_mean, clean_logprobs, kl_from_logprobs, next_token_logprobs

__all__ = ["ablation_stability", "cone_ablation", "pooled_ablation_and_steering"]


def pooled_ablation_and_steering(
    lm: LoadedModel,
    directions: DirectionSet,
    harmful_eval: Sequence[str],
    harmless_eval: Sequence[str],
    *,
    layer: int,
    position: Position,
    settings: RunSettings = RunSettings(max_new_tokens=16),
    coeffs: Sequence[float] = (1.0,),
    before: Sequence[bool] | np.ndarray | None = None,
    harmless_before: Sequence[bool] | np.ndarray | None = None,
    ablation_layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The headline causal test with the pooled direction, measured by generation.

    Ablation (unit direction, every layer or `ablation_layers`) on harmful prompts: refusal before /
    after and the harmless KL (on the harmless prompts the model answers un-intervened); addition (raw
    mean difference × coeff at `layer`) on harmless prompts: induced refusal. With `ablation_layers`,
    the every-layer ablation (Arditi et al.'s) is reported beside it under `all_layers`.
    `before` / `harmless_before`: un-intervened refusal flags already generated for the same prompts
    with the same settings (e.g. by `discover_tokens`), so they are not generated twice.
    """
    batch_size, system = settings.batch_size, settings.system
    vec = directions.get(POOLED, layer, position)
    abl = ablation(lm.model, vec, ablation_layers)
    if before is not None and len(before) != len(harmful_eval):
        raise AtlasError(f"pooled test: {len(before)} baseline flags for {len(harmful_eval)} harmful prompts")
    if harmless_before is not None and len(harmless_before) != len(harmless_eval):
        raise AtlasError(f"pooled test: {len(harmless_before)} flags for {len(harmless_eval)} harmless prompts")
    refused_before = (np.asarray(before, dtype=bool) if before is not None
                      else marker_flags(lm, harmful_eval, None, settings))
    after = marker_flags(lm, harmful_eval, abl, settings)
    harmless_refused = (np.asarray(harmless_before, dtype=bool) if harmless_before is not None
                        else marker_flags(lm, harmless_eval, None, settings))
    clean = clean_logprobs(lm, harmless_eval, batch_size=batch_size, system=system)[0]
    kl_each = kl_from_logprobs(clean, next_token_logprobs(lm, harmless_eval, intervention=abl, batch_size=batch_size,
                                                          system=system))
    compared = {}
    if ablation_layers is not None:
        everywhere = ablation(lm.model, vec)
        kl_everywhere = kl_from_logprobs(clean, next_token_logprobs(lm, harmless_eval, intervention=everywhere,
                                                                    batch_size=batch_size, system=system))
        compared = {"all_layers": {
            "refusal_after": float(marker_flags(lm, harmful_eval, everywhere, settings).mean()),
            "harmless_kl": answered_mean(kl_everywhere, harmless_refused),
            "harmless_kl_all": float(kl_everywhere.mean())}}
    induced = {}
    for c in coeffs:
        rate = marker_flags(lm, harmless_eval, addition(lm.model, vec, layer, coeff=c), settings)
        induced[str(c)] = float(rate.mean())
    return {
        "layer": layer, "position": position_label(position), "n_harmful": len(harmful_eval),
        "n_harmless": len(harmless_eval), "direction_norm": float(vec.norm()),
        "refusal_before": float(refused_before.mean()), "refusal_after": float(after.mean()),
        "harmless_refusal_before": float(harmless_refused.mean()),
        # capability cost: on the harmless prompts the model answers (where it over-refuses, un-refusing is the
        # intended effect of the ablation, not a cost); over every harmless prompt and the median beside it
        "harmless_kl": answered_mean(kl_each, harmless_refused),
        "harmless_kl_all": float(kl_each.mean()), "harmless_kl_median": float(np.median(kl_each)),
        "n_harmless_answered": int((~harmless_refused).sum()),
        "induced_refusal_rate": induced[str(coeffs[0])], "induced_by_coeff": induced,
        "ablated_layers": "all" if ablation_layers is None else [int(la) for la in ablation_layers], **compared,
    }


def ablation_stability(
    lm: LoadedModel,
    prompts: DirectionPrompts,
    harmful_eval: Sequence[str],
    tokens: TokenSpec,
    *,
    layer: int,
    position: Position,
    settings: RunSettings = RunSettings(),
    ablation_layers: Sequence[int] | None = None,
    n_boot: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """How much the pooled ablation depends on which prompts the direction was computed from.

    The pooled direction (as `compute_directions` builds it, with the same strata) is recomputed
    from `n_boot` bootstrap resamples of the direction prompts (within each node and harmless group)
    and ablated; each row gives first-token refusal and mean refusal log-odds on `harmful_eval`, and
    the resample's cosine to the full-sample direction (row `resample` -1). Why: a headline measured
    with one direction estimate can sit at a tipping point (docs/decisions.md, "Causal protocol").
    """
    ids = token_ids(tokens)
    groups = prompts.groups("ablation stability")
    x = prompts.at(layer, position)
    full = directions_from_means(group_means(x, groups), groups)["diff_means"][0, -1]
    weights = bootstrap_weights(groups, n_boot, torch.Generator().manual_seed(seed))
    resampled = directions_from_means(group_means(x, groups, weights), groups)["diff_means"][:, -1]
    rows = []
    for b, vec in enumerate([full, *resampled], start=-1):
        odds, first = first_token_scores(lm, harmful_eval, ids, ablation(lm.model, vec, ablation_layers),
                                         settings.batch_size, settings.system)
        rows.append({"resample": b, "layer": layer, "position": position_label(position), "n": len(harmful_eval),
                     "first_token_refusal_rate": float(first.mean()), "logit_score": float(odds.mean()),
                     "cosine_to_full": float(torch.nn.functional.cosine_similarity(vec, full, dim=0))})
    return pd.DataFrame(rows)


def cone_ablation(
    lm: LoadedModel,
    prompts: DirectionPrompts,
    harmful_eval: Sequence[str],
    harmless_eval: Sequence[str],
    tokens: TokenSpec,
    *,
    layer: int,
    position: Position,
    settings: RunSettings = RunSettings(),
    ablation_layers: Sequence[int] | None = None,
    max_extra: int = 2,
) -> pd.DataFrame:
    """Is refusal one direction or a cone? Ablate the pooled direction plus the first k principal axes of the
    node directions' residuals (each node's difference of means minus its pooled component), k = 0..max_extra.

    One row per k: first-token refusal and mean refusal log-odds on `harmful_eval`, harmless KL (prompts
    the model answers), the k-th residual singular value, and each node's loading on that axis
    (`loading:<node>`). Why: several refusal components would show as refusal left after the pooled
    ablation that one or two more axes remove (cf. Wollschläger et al.'s refusal cones).
    """
    ids = token_ids(tokens)
    batch_size, system = settings.batch_size, settings.system
    groups = prompts.groups("cone ablation")
    x = prompts.at(layer, position)
    names = groups.node_ids
    if len(names) < 2:
        raise AtlasError("cone ablation: need harmful prompts of at least 2 nodes")
    diffs = directions_from_means(group_means(x, groups), groups)["diff_means"][0]  # [K+1, d], pooled last
    per_node, pooled = diffs[:-1], diffs[-1]
    u = pooled / pooled.norm()
    residual = per_node - (per_node @ u)[:, None] * u[None]
    _, sing, axes = torch.linalg.svd(residual, full_matrices=False)
    clean = clean_logprobs(lm, harmless_eval, batch_size=batch_size, system=system)[0]
    answered_refused = np.isin(clean.argmax(-1).numpy(), ids)
    rows = []
    for k in range(min(max_extra, len(names) - 1) + 1):
        basis = torch.cat([u[None], axes[:k]]) if k else u[None]
        abl = ablation(lm.model, basis, ablation_layers)
        odds, first = first_token_scores(lm, harmful_eval, ids, abl, batch_size, system)
        kl = kl_from_logprobs(clean, next_token_logprobs(lm, harmless_eval, intervention=abl, batch_size=batch_size,
                                                          system=system))
        row = {"extra_axes": k, "layer": layer, "position": position_label(position), "n": len(harmful_eval),
               "first_token_refusal_rate": float(first.mean()), "logit_score": float(odds.mean()),
               "harmless_kl": answered_mean(kl, answered_refused),
               "singular_value": float(sing[k - 1]) if k else float("nan")}
        if k:
            row.update({f"loading:{n}": float(r @ axes[k - 1]) for n, r in zip(names, residual, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)
