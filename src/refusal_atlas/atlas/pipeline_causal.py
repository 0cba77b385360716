"""The `causal` stage of `run`: the causal protocol (`mechinterp.causal.protocol`) on the run's prompts.

Evaluation prompts come from the run's held-out split (`run_split == "eval"`), never from the
prompts the directions were computed on nor from those the organism was fine-tuned on. The
refusal position is the last post-instruction token (-1); the layer is chosen per run by
direction selection on the pooled direction over a few candidate layers (bypass / induce / KL,
Arditi et al.).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.markup import escape
from torch import Tensor

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.runconfig import RunConfig, evaluation_rows, model_prompts
from refusal_atlas.atlas.stages import StageContext
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import block_states, restored_blocks
from refusal_atlas.lm.models import LoadedModel, load_model
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal import files, protocol
from refusal_atlas.mechinterp.causal.common import first_token_scores
from refusal_atlas.mechinterp.causal.cross import cross_summary
from refusal_atlas.mechinterp.causal.inputs import DirectionPrompts
from refusal_atlas.mechinterp.causal.selection import candidate_layers, default_ablation_starts
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.organism.controls import CONTROL_CONDITION, control_rows

__all__ = ["NEW_TOKENS", "PROTOCOL_VERSION", "REFUSAL_POSITION", "EvalSets", "eval_sets", "run"]

REFUSAL_POSITION = -1
PROTOCOL_VERSION = 10  # bump when a code change alters what this stage measures (cached results are then redone)
NEW_TOKENS = 16  # generated tokens behind every marker-detector refusal rate of this stage
# a node's band scan needs refusal to divide among windows: at least half its evaluation prompts refused
BAND_SCAN_MIN_REFUSAL = 0.5


@dataclass(frozen=True)
class EvalSets:
    """The run's evaluation prompts: `harmful` {node: prompts} and `harmless` measure every reported rate;
    `harmful_val` / `harmless_val` choose the layer and the steering dose and are disjoint from them;
    `conditioned` holds the condition variants of the analysed nodes' prompts."""

    harmful: dict[str, list[str]]
    harmless: list[str]
    conditioned: pd.DataFrame
    harmful_val: dict[str, list[str]]
    harmless_val: list[str]


def eval_sets(prompts: pd.DataFrame, nodes: list[str], per_node: int, n_harmless: int, seed: int,
              out: Path | None = None, per_node_val: int = 0, n_harmless_val: int = 0) -> EvalSets:
    """Draw the evaluation and validation sets (seeded) from the run's eval split."""
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
    return EvalSets(sets, harmless, conditioned, {k: v for k, v in val.items() if v}, harmless_val)


def run(cfg: RunConfig, ctx: StageContext, lm: LoadedModel) -> dict[str, Any]:
    """The stage: every protocol step on the run's evaluation prompts; returns the stage's metrics."""
    out: Path = ctx.out / schema.CAUSAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    sizes = cfg.sizes()
    ds = DirectionSet.load(ctx.out / schema.DIRECTIONS_DIR)
    prompts = model_prompts(ctx.out, cfg)
    nodes = [n for n in ds.nodes if n != POOLED]
    ev = eval_sets(prompts, nodes, sizes["per_node_eval"], sizes["harmless_eval"], cfg.seed, ctx.out,
                   sizes.get("per_node_val", 0), sizes.get("harmless_val", 0))
    sets, harmless = ev.harmful, ev.harmless
    harmful_all = [p for ps in sets.values() for p in ps]
    harmful_val = [p for ps in ev.harmful_val.values() for p in ps]
    harmless_val = ev.harmless_val
    if not harmful_val or not harmless_val:  # too few prompts for a separate validation set: halves of eval
        harmful_val = harmful_all[: max(4, len(harmful_all) // 2)]
        harmless_val = harmless[: max(8, len(harmless) // 2)]
    settings = RunSettings(batch_size=cfg.batch_size, max_new_tokens=NEW_TOKENS, progress=cfg.progress)

    # the reference model's block weights, read first so that a reference that does not fit fails before any work
    reference = _reference_states(cfg.reference_model, lm) if cfg.reference_model is not None else None

    # Refusal-opening tokens, discovered from the model's own generations on held-out prompts.
    try:
        found = protocol.discover_step(lm, harmful_all, harmless, out, settings)
    except AtlasError as exc:  # a model that never refuses has nothing to ablate: say so, keep the atlas
        ctx.console.print(f"[yellow]causal tests skipped: {escape(str(exc))}[/yellow]")
        files.write_json({"reason": str(exc)}, out, files.SKIPPED)
        return {"skipped": str(exc)}
    s = protocol.CausalSession(lm, ds, found.tokens, out, settings)

    # the stage parameter `verdict_evidence_only` (set by `validate`): only what a validated rule reads — the
    # pooled layer (every-layer ablation, no dose), cross-ablation and the band scan; no headline, robustness,
    # steering, conditions or wording
    lean = bool(ctx.params.get("verdict_evidence_only", False))
    candidates = candidate_layers(lm.n_layers, list(ds.layers), quick=cfg.quick)
    chosen = protocol.select_step(s, harmful_val, harmless_val, layers=candidates, positions=[REFUSAL_POSITION],
                                  ablation_starts=[] if lean else default_ablation_starts(lm.n_layers), dose=not lean)
    selection, coeff = chosen.pooled, chosen.coefficient
    layer, scope = int(selection.layer), selection.ablation_layers

    # the un-ablated generations are the ones the refusal tokens were discovered from (same prompts, settings)
    headline: dict[str, Any] = {} if lean else protocol.pooled_step(
        s, harmful_all, harmless, selection, coeffs=(coeff,) if coeff == 1.0 else (coeff, 1.0),
        before=found.refused_harmful, harmless_before=found.refused_harmless)
    captured = None if lean else DirectionPrompts.load(_activations_dir(ctx), ctx.out / schema.DIRECTIONS_DIR)
    stability: dict[str, Any] = {}
    cone: dict[str, Any] = {}
    # stability and cone describe the headline's robustness; no verdict reads them, so `validate` can skip them
    if captured is not None and sizes.get("robustness_checks", 1):
        stability = protocol.stability_step(s, captured, harmful_all, selection, n_boot=3 if cfg.quick else 5,
                                            seed=cfg.seed)
        cone = protocol.cone_step(s, captured, harmful_all, harmless, selection)

    cross = protocol.cross_ablation_step(s, sets, harmless, layer=layer, position=REFUSAL_POSITION,
                                         ablation_layers=scope)

    steer_layers = sorted({candidates[0], candidates[len(candidates) // 2], layer})
    if not lean:
        # per-node steering table on half the harmless eval prompts (first token only: 7 directions x 3 layers)
        protocol.steering_step(s, [*nodes, POOLED], harmless[: max(8, len(harmless) // 2)], layers=steer_layers,
                               position=REFUSAL_POSITION)

    # which blocks write each refusing node's refusal (context beside the restoration-band verdict)
    base = cross[cross["source"] == "none"].set_index("target")
    # the un-ablated rows: (first-token rate, mean log-odds, per-prompt log-odds) per node, reused as baselines
    measured = {n: (float(base.at[n, "first_token_refusal_rate"]), float(base.at[n, "logit_score"]),
                    list(base.at[n, "prompt_logit_scores"])) for n in sets if n in base.index}
    scanned = {n: sets[n] for n in nodes
               if n in base.index and float(base.at[n, "first_token_refusal_rate"]) >= BAND_SCAN_MIN_REFUSAL}
    bands_summary: dict[str, Any] = {}
    if scanned:
        # the un-ablated rows of the cross-ablation are the same prompts, tokens and measure: reused as baselines
        bands = protocol.band_step(s, scanned, position=REFUSAL_POSITION, baselines={n: measured[n] for n in scanned})
        bands_summary = {"nodes": sorted(scanned), "scan_layer": int(bands["scan_layer"].iloc[0]),
                         "windows": int((bands["kind"] == "window").sum() // max(1, len(scanned)))}

    # the shared-vs-separable evidence: every node's late-layer direction ablated, refusal on every node
    protocol.components_step(s, sets, harmless, position=REFUSAL_POSITION)
    # where each node's refusal lives: windows of blocks set back to the reference model's weights
    restoration_summary: dict[str, Any] = {}
    if reference is not None:
        restored = protocol.restoration_step(s, reference, sets, reference_name=str(cfg.reference_model),
                                             baselines=measured)
        restoration_summary = {"reference": cfg.reference_model, "nodes": sorted(set(restored["node"])),
                               "windows": int(len(restored) // max(1, restored["node"].nunique()))}

    cond_summary: dict[str, Any] = {}
    if len(ev.conditioned) and not lean:
        # Refusal here is the greedy first token (one forward pass per prompt, no generation), so every
        # condition variant of the eval split can be afforded; the projection comes from a capture pass.
        per_node_cap = 24 if cfg.quick else sizes.get("condition_per_node", 48)
        rows = ev.conditioned.sample(frac=1.0, random_state=cfg.seed).groupby("analysis_node").head(per_node_cap)
        rows = rows.assign(node=rows["analysis_node"]).reset_index(drop=True)
        # each framed request's length-matched control twin, so a condition is read against added text that
        # states nothing rather than against the bare request (organism/controls.py)
        rows = pd.concat([rows, control_rows(rows)], ignore_index=True)
        _, first = first_token_scores(lm, rows["prompt"].tolist(), found.tokens.ids, batch_size=cfg.batch_size)
        table, _ = protocol.conditions_step(s, rows[["prompt", "node", "condition", "expected"]], layer=layer,
                                            position=REFUSAL_POSITION, refused=first, refusal_measure="first_token",
                                            seed=cfg.seed)
        changed = table[~table["condition"].isin(["(none)", CONTROL_CONDITION])]
        cond_summary = {"rows": len(table), "control_prompts": int((rows["condition"] == CONTROL_CONDITION).sum()),
                        "mean_abs_projection_delta": float(np.nanmean(np.abs(changed["projection_delta"])))
                        if len(changed) else None}

    wording_summary: dict[str, Any] = {}
    if captured is not None:
        wordings, shared = _organism_wordings(ctx.out / schema.ORGANISM_JSON.path, ds)
        wording = protocol.wording_step(s, captured, position=REFUSAL_POSITION, wordings=wordings,
                                        shared_wording=shared, seed=cfg.seed, lens_layers=candidates)
        best = wording.loc[wording["probe_accuracy"].idxmax()] if len(wording) else None
        wording_summary = {"best_probe_layer": int(best["layer"]) if best is not None else None,
                           "best_probe_accuracy": float(best["probe_accuracy"]) if best is not None else None}

    refused_h, refused_hl = found.refused_harmful, found.refused_harmless
    if lean:
        return {"layer": layer, "position": REFUSAL_POSITION, "candidates": candidates, "verdict_evidence_only": True,
                "cross_ablation": cross_summary(cross), "bands": bands_summary, "restoration": restoration_summary,
                "baseline_refusal_harmful": float(np.mean(refused_h)) if len(refused_h) else None}
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
        "conditions": cond_summary, "wording": wording_summary, "bands": bands_summary,
        "restoration": restoration_summary,
        "baseline_refusal_harmful": float(np.mean(refused_h)) if len(refused_h) else None,
        "baseline_refusal_harmless": float(np.mean(refused_hl)) if len(refused_hl) else None,
    }


def _reference_states(spec: str, lm: LoadedModel) -> dict[int, dict[str, Tensor]]:
    """The reference model's decoder-block weights (the model itself is not kept); a one-line error when they do
    not fit the analysed model's blocks."""
    states = block_states(load_model(spec).model)
    with restored_blocks(lm.model, states, states):  # checks every block's names and shapes, then puts them back
        pass
    return states


def _activations_dir(ctx: StageContext) -> Path:
    """The capture folder the directions stage recorded (its result names it)."""
    return Path(ctx.results.get("directions", {}).get("activations", ctx.out / schema.ACTIVATIONS_DIR))


def _organism_wordings(organism_json: Path, ds: DirectionSet) -> tuple[dict[str, str] | None, str | None]:
    """({analysed node: its refusal wording}, the shared wording) from the run's organism, or (None, None)."""
    if not organism_json.is_file():
        return None, None
    info = json.loads(organism_json.read_text(encoding="utf-8"))
    policy = info.get("policy", {})
    wordings = {n: p["refusal_text"] for n, p in policy.items() if n in ds.nodes}
    return wordings, (info.get("wording") or {}).get("shared")
