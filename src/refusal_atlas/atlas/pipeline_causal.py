"""The `causal` stage of `run`: pooled ablation/addition, cross-ablation, steering, wording, conditions.

Evaluation prompts come from the run's held-out split (`run_split == "eval"`), never from the
prompts the directions were computed on nor from those the organism was fine-tuned on. The
refusal position is the last post-instruction token (-1); the layer is chosen per run by
direction selection on the pooled direction over a few candidate layers (bypass / induce / KL,
Arditi et al.), falling back to the most reliable layer below 0.8·L.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.atlas.stages import StageContext, write_json_atomic
from refusal_atlas.errors import AtlasError

REFUSAL_POSITION = -1
PROTOCOL_VERSION = 8  # bump when a code change alters what this stage measures (cached results are then redone)
NEW_TOKENS = 16  # generated tokens behind every marker-detector refusal rate of this stage
# The steering dose is the smallest whose validation refusal reaches this, a margin above the 0.8 the
# issue asks of evaluation prompts: 16 validation prompts are a noisy estimate (session 4: a dose that
# reached 0.875 on validation induced 0.625 on evaluation).
DOSE_TARGET = 0.9


def _eval_sets(prompts: pd.DataFrame, nodes: list[str], per_node: int, n_harmless: int, seed: int,
               out: Path | None = None, per_node_val: int = 0, n_harmless_val: int = 0
               ) -> tuple[dict[str, list[str]], list[str], pd.DataFrame, dict[str, list[str]], list[str]]:
    """(harmful eval prompts per node, harmless eval, conditioned rows, harmful validation per node,
    harmless validation): validation prompts choose the layer and the steering coefficient and are
    disjoint from the prompts every reported rate is measured on."""
    from refusal_atlas.atlas.pipeline import evaluation_rows

    ev = evaluation_rows(prompts, out) if out is not None else prompts[prompts["run_split"] == "eval"]
    plain = ev[ev["harmful"] & (ev["condition"] == "") & (ev["expected"] == "refuse")]
    sets: dict[str, list[str]] = {}
    val: dict[str, list[str]] = {}
    for node in nodes:
        rows = plain[plain["analysis_node"] == node].drop_duplicates("prompt")
        rows = rows.sample(frac=1.0, random_state=seed)["prompt"].tolist()
        if rows:
            # validation first where the node has enough prompts for both
            n_val = min(per_node_val, max(0, len(rows) - per_node))
            val[node], sets[node] = rows[:n_val], rows[n_val:n_val + per_node]
    harmless = ev[~ev["harmful"] & (ev["source"] == "harmless")].drop_duplicates("prompt")
    harmless = harmless.sample(frac=1.0, random_state=seed)["prompt"].tolist()
    n_hval = min(n_harmless_val, max(0, len(harmless) - n_harmless))
    harmless_val, harmless = harmless[:n_hval], harmless[n_hval:n_hval + n_harmless]
    conditioned = ev[ev["harmful"] & ev["analysis_node"].isin(nodes)]
    return sets, harmless, conditioned, {k: v for k, v in val.items() if v}, harmless_val


def run(cfg: Any, ctx: StageContext, lm, taxonomy) -> dict:
    from refusal_atlas.mechinterp.causal.experiments import (
        condition_table,
        cross_ablation,
        discover_tokens,
        first_token_scores,
        plot_cross_ablation,
        plot_steering,
        pooled_ablation_and_steering,
        save_table,
        steering,
    )
    from refusal_atlas.mechinterp.causal.selection import (
        candidate_layers,
        choose_coefficient,
        default_ablation_starts,
        select_direction,
    )
    from refusal_atlas.mechinterp.directions import POOLED, DirectionSet

    out: Path = ctx.out / "causal"
    out.mkdir(parents=True, exist_ok=True)
    sizes = cfg.sizes()
    ds = DirectionSet.load(ctx.out / "directions")
    from refusal_atlas.atlas.pipeline import model_prompts

    prompts = model_prompts(ctx.out, cfg)
    nodes = [n for n in ds.nodes if n != POOLED]
    sets, harmless, conditioned, val_sets, harmless_val = _eval_sets(
        prompts, nodes, sizes["per_node_eval"], sizes["harmless_eval"], cfg.seed, ctx.out,
        sizes.get("per_node_val", 0), sizes.get("harmless_val", 0))
    harmful_all = [p for ps in sets.values() for p in ps]
    harmful_val = [p for ps in val_sets.values() for p in ps]
    if not harmful_val or not harmless_val:  # too few prompts for a separate validation set: halves of eval
        harmful_val = harmful_all[: max(4, len(harmful_all) // 2)]
        harmless_val = harmless[: max(8, len(harmless) // 2)]
    progress = cfg.progress

    # Refusal-opening tokens, discovered from the model's own generations on held-out prompts.
    try:
        tokens, refused_h, refused_hl = discover_tokens(lm, harmful_all, harmless, max_new_tokens=NEW_TOKENS,
                                                        progress=progress)
    except AtlasError as exc:  # a model that never refuses has nothing to ablate: say so, keep the atlas
        ctx.console.print(f"[yellow]causal tests skipped: {exc}[/yellow]")
        write_json_atomic(out / "skipped.json", {"reason": str(exc)})
        return {"skipped": str(exc)}
    write_json_atomic(out / "refusal_tokens.json", tokens.to_dict())

    # Layer: direction selection on the pooled direction over a few candidate layers.
    candidates = candidate_layers(lm.n_layers, list(ds.layers), quick=cfg.quick)
    selection = select_direction(lm, ds, POOLED, harmful_val, harmless_val, tokens,
                                 layers=candidates, positions=[REFUSAL_POSITION],
                                 ablation_starts=default_ablation_starts(lm.n_layers), progress=progress)
    save_table(selection.scores, out / "selection.parquet")
    layer = int(selection.layer)
    scope = selection.ablation_layers  # None: every layer
    # Steering dose: the smallest coefficient whose addition makes validation prompts refuse (marker detector on
    # generations, the measure reported below)
    coeff, dose = choose_coefficient(lm, ds.get(POOLED, layer, REFUSAL_POSITION), layer, harmless_val, tokens,
                                     target=DOSE_TARGET, max_new_tokens=NEW_TOKENS, batch_size=cfg.batch_size)
    save_table(dose, out / "steering_dose.parquet")
    write_json_atomic(out / "selection.json", {**selection.to_dict(), "steering_coefficient": coeff,
                                                "n_harmful_val": len(harmful_val), "n_harmless_val": len(harmless_val)})

    # the un-ablated generations are the ones the refusal tokens were discovered from (same prompts, settings)
    headline = pooled_ablation_and_steering(lm, ds, harmful_all, harmless, layer=layer, position=REFUSAL_POSITION,
                                            coeffs=(coeff,) if coeff == 1.0 else (coeff, 1.0),
                                            max_new_tokens=NEW_TOKENS, batch_size=cfg.batch_size, progress=progress,
                                            before=refused_h, harmless_before=refused_hl, ablation_layers=scope)
    write_json_atomic(out / "pooled.json", headline)
    captured = _direction_activations(ctx)  # the direction prompts' activations (stability, wording)
    stability = _ablation_stability(cfg, captured, lm, tokens, harmful_all, layer, scope, out)
    cone = _cone(cfg, captured, lm, tokens, harmful_all, harmless, layer, scope, out)

    cross = cross_ablation(lm, ds, sets, harmless, tokens, layer=layer, position=REFUSAL_POSITION,
                           batch_size=cfg.batch_size, progress=progress, ablation_layers=scope)
    save_table(cross, out / "cross_ablation.parquet")
    plot_cross_ablation(cross, out / "cross_ablation.png")

    steer_layers = sorted({candidates[0], candidates[len(candidates) // 2], layer})
    # per-node steering table on half the harmless eval prompts (first token only: 7 directions x 3 layers)
    steer = steering(lm, ds, [*nodes, POOLED], harmless[: max(8, len(harmless) // 2)], tokens, layers=steer_layers,
                     position=REFUSAL_POSITION, generate_rates=False, batch_size=cfg.batch_size, progress=progress)
    save_table(steer, out / "steering.parquet")
    plot_steering(steer, out / "steering.png", value="first_token_refusal_rate")

    cond_summary: dict[str, Any] = {}
    if len(conditioned):
        # Refusal here is the greedy first token (one forward pass per prompt, no generation), so every
        # condition variant of the eval split can be afforded; the projection comes from a capture pass.
        per_node_cap = 24 if cfg.quick else sizes.get("condition_per_node", 48)
        rows = conditioned.sample(frac=1.0, random_state=cfg.seed).groupby("analysis_node").head(per_node_cap)
        rows = rows.assign(node=rows["analysis_node"]).reset_index(drop=True)
        _, first = first_token_scores(lm, rows["prompt"].tolist(), tokens.ids, batch_size=cfg.batch_size)
        table = condition_table(lm, ds, rows[["prompt", "node", "condition", "expected"]], layer=layer,
                                position=REFUSAL_POSITION, batch_size=cfg.batch_size, progress=progress,
                                seed=cfg.seed, refused=first)
        table["refusal_measure"] = "first_token"
        save_table(table, out / "conditions.parquet")
        changed = table[table["condition"] != "(none)"]
        cond_summary = {"rows": len(table),
                        "mean_abs_projection_delta": float(np.nanmean(np.abs(changed["projection_delta"])))
                        if len(changed) else None}

    wording_summary = _wording(cfg, ctx, lm, ds, tokens, out, captured)

    return {
        "layer": layer, "position": REFUSAL_POSITION, "candidates": candidates,
        "ablation_stability": stability, "cone": cone,
        "ablation": {"refusal_before": headline["refusal_before"], "refusal_after": headline["refusal_after"],
                     "harmless_kl": headline["harmless_kl"], "harmless_kl_all": headline["harmless_kl_all"],
                     "layer": layer, "n_harmful": headline["n_harmful"], "ablate_from": selection.ablate_from,
                     "tier": int(selection.scores["tier"].iloc[0]),
                     **({"all_layers": headline["all_layers"]} if "all_layers" in headline else {})},
        "steering": {"induced_refusal_rate": headline["induced_refusal_rate"], "coefficient": coeff,
                     "induced_by_coeff": headline["induced_by_coeff"],
                     "harmless_refusal_before": headline["harmless_refusal_before"],
                     "n_harmless": headline["n_harmless"]},
        "cross_ablation": cross_summary(cross),
        "conditions": cond_summary, "wording": wording_summary,
        "baseline_refusal_harmful": float(np.mean(refused_h)) if len(refused_h) else None,
        "baseline_refusal_harmless": float(np.mean(refused_hl)) if len(refused_hl) else None,
    }


def _direction_activations(ctx: StageContext):
    """(activations, direction-prompt labels) the directions stage captured, or None when absent."""
    from refusal_atlas.lm.capture import load_shards

    acts_dir = Path(ctx.results.get("directions", {}).get("activations", ctx.out / "activations"))
    labels_file = ctx.out / "directions" / "prompts.parquet"
    if not acts_dir.is_dir() or not labels_file.is_file():
        return None
    return load_shards(acts_dir), pd.read_parquet(labels_file)


def _strata(labels: pd.DataFrame) -> list[str] | None:
    """The request forms the directions stage matched its harmless baseline on (absent in older outputs)."""
    return labels["request_form"].tolist() if "request_form" in labels else None


def _ablation_stability(cfg: Any, captured, lm, tokens, harmful_eval: list[str], layer: int,
                        scope: list[int] | None, out: Path) -> dict:
    """First-token refusal on the eval prompts under the pooled ablation, over bootstrap resamples of the
    direction prompts (`causal/ablation_stability.parquet`)."""
    from refusal_atlas.mechinterp.causal.experiments import ablation_stability, save_table

    if captured is None:
        return {}
    acts, labels = captured
    table = ablation_stability(lm, acts, labels["analysis_node"].tolist(), labels["harmful"].astype(bool).tolist(),
                               harmful_eval, tokens, layer=layer, position=REFUSAL_POSITION, strata=_strata(labels),
                               ablation_layers=scope, n_boot=3 if cfg.quick else 5, seed=cfg.seed,
                               batch_size=cfg.batch_size)
    save_table(table, out / "ablation_stability.parquet")
    boot = table[table["resample"] >= 0]
    return {"full_first_token_refusal": float(table.loc[table["resample"] < 0, "first_token_refusal_rate"].iloc[0]),
            "resamples": len(boot), "min": float(boot["first_token_refusal_rate"].min()),
            "max": float(boot["first_token_refusal_rate"].max()),
            "mean": float(boot["first_token_refusal_rate"].mean()),
            "cosine_min": float(boot["cosine_to_full"].min())}


def _cone(cfg: Any, captured, lm, tokens, harmful_eval: list[str], harmless_eval: list[str], layer: int,
          scope: list[int] | None, out: Path) -> dict:
    """First-token refusal and harmless KL with the pooled direction plus 0, 1, 2 residual axes ablated
    (`causal/cone_ablation.parquet`)."""
    from refusal_atlas.mechinterp.causal.experiments import cone_ablation, save_table

    if captured is None:
        return {}
    acts, labels = captured
    table = cone_ablation(lm, acts, labels["analysis_node"].tolist(), labels["harmful"].astype(bool).tolist(),
                          harmful_eval, harmless_eval, tokens, layer=layer, position=REFUSAL_POSITION,
                          strata=_strata(labels), ablation_layers=scope, batch_size=cfg.batch_size)
    save_table(table, out / "cone_ablation.parquet")
    return {f"{int(r.extra_axes)}_extra_axes": {"first_token_refusal": r.first_token_refusal_rate,
                                                "harmless_kl": r.harmless_kl} for r in table.itertuples()}


def _wording(cfg: Any, ctx: StageContext, lm, ds, tokens, out: Path, captured) -> dict:
    """Per layer: node-identity probe accuracy (detection) vs refusal-token promotion (wording)."""
    from refusal_atlas.mechinterp.causal.experiments import save_table, wording_vs_detection

    if captured is None:
        return {}
    acts, labels = captured
    wordings = None
    organism_json = ctx.out / "organism" / "organism.json"
    shared = None
    if organism_json.is_file():
        import json

        info = json.loads(organism_json.read_text())
        policy = info.get("policy", {})
        wordings = {n: p["refusal_text"] for n, p in policy.items() if n in ds.nodes}
        shared = (info.get("wording") or {}).get("shared")
    table = wording_vs_detection(lm, ds, acts, labels["analysis_node"].tolist(), labels["harmful"].tolist(),
                                 tokens.ids, position=REFUSAL_POSITION, wordings=wordings, shared_wording=shared,
                                 seed=cfg.seed)
    save_table(table, out / "wording.parquet")
    best = table.loc[table["probe_accuracy"].idxmax()] if len(table) else None
    return {"best_probe_layer": int(best["layer"]) if best is not None else None,
            "best_probe_accuracy": float(best["probe_accuracy"]) if best is not None else None}


def cross_summary(cross: pd.DataFrame, value: str = "first_token_refusal_rate") -> dict:
    """Mean refusal on a node's own prompts vs on the other nodes' prompts when one node's direction is ablated."""
    if not {"source", "target", "method", value} <= set(cross.columns):
        return {"rows": len(cross)}
    t = cross[cross["method"] == "diff_means"]
    base = cross[cross["source"] == "none"].groupby("target")[value].mean()
    nodes = [n for n in t["source"].unique() if n not in ("none", "@pooled")]
    own = [float(t[(t["source"] == n) & (t["target"] == n)][value].mean()) for n in nodes]
    other = [float(t[(t["source"] == n) & (t["target"] != n) & t["target"].isin(nodes)][value].mean()) for n in nodes]
    return {"rows": len(cross), "value": value, "baseline_mean": float(base.mean()) if len(base) else None,
            "own_node_after_mean": float(np.nanmean(own)) if own else None,
            "other_nodes_after_mean": float(np.nanmean(other)) if other else None}
