"""The whole causal protocol on a model organism's prompt tables (what `organism test` runs).

The organism's folder is read by the caller (`refusal_atlas.atlas.organism_test`), which passes its
tables here as an `OrganismTables`: interpretability code does not depend on how organisms are built.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.models import LoadedModel, load_model
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal import files, protocol, selection
from refusal_atlas.mechinterp.causal.common import given_tokens
from refusal_atlas.mechinterp.causal.inputs import DirectionPrompts, eval_sets_from_table
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet, compute_directions
from refusal_atlas.mechinterp.interventions import layer_subset
from refusal_atlas.mechinterp.request_form import request_forms
from refusal_atlas.mechinterp.scoring import behaves_as_labelled, behaviour_mask

__all__ = ["OrganismTables", "causal_suite"]


@dataclass(frozen=True)
class OrganismTables:
    """An organism's model and tables, as the suite needs them.

    `prompts`: every train / held-out row (`prompt`, `node`, `harmful`, `split`, `category`, `condition`,
    `source`); `adherence`: held-out rows with the organism's `refused` flag; `info`: its organism.json
    (`policy` {node: {refusal_text}}, `wording` {shared}); `branch_of`: a node's taxonomy branch, or None
    when the organism's nodes are not in the taxonomy at hand.
    """

    model_dir: Path
    prompts: pd.DataFrame
    adherence: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    branch_of: Callable[[str], str] | None = None
    source: str = ""


def causal_suite(
    organism: OrganismTables,
    out_dir: str | Path,
    *,
    level: str = "root",
    positions: Sequence[Position] = (-1, -2, -3, -4, -5),
    select_layers: int | None = None,
    n_val: int = 16,
    coeffs: Sequence[float] = (1.0,),
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = True,
    refusal_tokens: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Directions → tokens → selection → pooled ablation / addition → cross-ablation → steering by layer →
    wording vs detection → conditions; writes the protocol's files and `causal.json`, returns the metrics.

    Directions are extracted from the organism's `train` and `extra` prompts (never the held-out
    ones) with labels at the `level` of the taxonomy ("root": each node's branch, so every label
    has several prompts; "node": the nodes themselves). Evaluation uses the held-out split.
    The pooled direction is selected as `run` selects it (`selection.candidate_layers`, narrower
    ablation scopes, the same tiers); `select_layers` = N instead spreads N candidate layers evenly.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(organism.model_dir)
    settings = RunSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    rows = organism.prompts
    branch_of = organism.branch_of

    def label(node: str) -> str:
        if not node:
            return ""
        return branch_of(node) if level == "root" and branch_of is not None else node

    t = time.perf_counter()
    prompts, ds = _directions(lm, rows, label, positions, out, settings, organism.source, level)
    timings["directions"] = time.perf_counter() - t

    # refusal tokens from the organism's own replies on training prompts
    t = time.perf_counter()
    train = rows[rows["split"] == "train"]
    tr_harm = list(train[(train["category"] == "refuse") & (train["condition"] == "")]["prompt"])[:24]
    tr_harmless = list(train[train["category"] == "harmless"]["prompt"])[:24]
    if refusal_tokens is not None:  # given (e.g. a model that never refuses, in tests)
        tokens = given_tokens(lm, refusal_tokens)
        protocol.write_tokens(tokens, out, lm.revision)
    else:
        tokens = protocol.discover_step(lm, tr_harm, tr_harmless, out,
                                        settings.with_(max_new_tokens=12)).tokens
    session = protocol.CausalSession(lm, ds, tokens, out, settings)
    timings["tokens"] = time.perf_counter() - t

    # select the pooled direction's (layer, position, scope) on the direction prompts
    t = time.perf_counter()
    grid = selection.candidate_layers(lm.n_layers) if select_layers is None else layer_subset(lm.n_layers,
                                                                                             select_layers, 0.8)
    val_harm = [p for p, h in zip(prompts.prompts, prompts.harmful, strict=True) if h][:n_val]
    val_harmless = [p for p, h in zip(prompts.prompts, prompts.harmful, strict=True) if not h][:n_val]
    cand_pos = list(positions)[:2]
    starts = selection.default_ablation_starts(lm.n_layers)
    chosen = protocol.select_step(session, val_harm, val_harmless, layers=grid, positions=cand_pos,
                                  ablation_starts=starts, previous=_previous(out, grid, cand_pos, starts, lm.n_layers))
    sel = chosen.pooled
    timings["select"] = time.perf_counter() - t

    # the headline: pooled ablation and addition on held-out prompts
    t = time.perf_counter()
    _, harmless_eval = eval_sets_from_table(rows, ds.nodes, split="heldout")
    held = rows[(rows["split"] == "heldout") & (rows["category"] == "refuse") & (rows["condition"] == "")]
    headline = protocol.pooled_step(session, list(held["prompt"]), harmless_eval, sel, coeffs=coeffs)
    timings["headline"] = time.perf_counter() - t

    # cross-ablation between labels (node or branch directions, their residuals, the pooled one)
    t = time.perf_counter()
    held_sets: dict[str, list[str]] = {label(n): [] for n in held["node"]}
    for p, n in zip(held["prompt"], held["node"], strict=True):
        held_sets[label(n)].append(p)
    held_sets = {k: v for k, v in held_sets.items() if k in ds.nodes}
    cross = protocol.cross_ablation_step(session, held_sets, harmless_eval, layer=sel.layer, position=sel.position,
                                         ablation_layers=sel.ablation_layers)
    summary = pd.read_parquet(out / files.CROSS_ABLATION_SUMMARY.name)
    timings["cross_ablation"] = time.perf_counter() - t

    # steering by layer (pooled direction, first-token refusal; the headline rate is generated above)
    t = time.perf_counter()
    protocol.steering_step(session, [POOLED], harmless_eval, layers=grid, position=sel.position)
    timings["steering"] = time.perf_counter() - t

    # wording vs detection; a branch's wording is its nodes' own wordings together
    t = time.perf_counter()
    shared = (organism.info.get("wording") or {}).get("shared")
    wordings: dict[str, str] = {}
    for n, p in organism.info.get("policy", {}).items():
        if p.get("refusal_text") and p["refusal_text"] != shared and label(n) in ds.nodes:
            wordings[label(n)] = (wordings.get(label(n), "") + " " + p["refusal_text"]).strip()
    protocol.wording_step(session, prompts, position=sel.position, wordings=wordings or None, shared_wording=shared,
                          lens_layers=grid)
    timings["wording"] = time.perf_counter() - t

    # conditions: held-out framed prompts vs their unconditioned originals (the organism's refusal flags)
    t = time.perf_counter()
    adh = organism.adherence
    cond_rows = adh[adh["harmful"].astype(bool)]
    with_rules = set(cond_rows.loc[cond_rows["condition"] != "", "node"])
    cond_rows = cond_rows[cond_rows["node"].isin(with_rules)].reset_index(drop=True)
    node_of = {n: label(n) for n in cond_rows["node"].unique() if label(n) in ds.nodes}
    _, cond_summary = protocol.conditions_step(session, cond_rows.drop(columns=["refused"]), layer=sel.layer,
                                               position=sel.position, node_of=node_of,
                                               refused=list(cond_rows["refused"]), refusal_measure="adherence")
    timings["conditions"] = time.perf_counter() - t

    pooled_rows = summary[summary["source"] == POOLED]
    metrics = {
        "ablation": {**{k: headline[k] for k in ("refusal_before", "refusal_after", "harmless_kl", "layer",
                                                 "position", "n_harmful", "n_harmless")},
                     "ablate_from": sel.ablate_from, **({"all_layers": headline["all_layers"]}
                                                        if "all_layers" in headline else {})},
        "steering": {"induced_refusal_rate": headline["induced_refusal_rate"],
                     "induced_by_coeff": headline["induced_by_coeff"],
                     "harmless_refusal_before": headline["harmless_refusal_before"]},
        "selection": sel.to_dict(),
        "refusal_tokens": tokens.tokens,
        "cross_ablation": {
            "pooled_first_token_refusal": float(pooled_rows["all"].iloc[0]) if len(pooled_rows) else None,
            "own_vs_others": summary[summary["source"] != POOLED].to_dict("records"),
            "rows": len(cross),
        },
        "conditions": cond_summary.to_dict("records"),
        "timings": {**timings, "total": time.perf_counter() - t0},
    }
    files.write_json(metrics, out, files.SUITE_METRICS)
    return metrics


def _directions(lm: LoadedModel, rows: pd.DataFrame, label: Callable[[str], str], positions: Sequence[Position],
                out: Path, settings: RunSettings, source: str, level: str) -> tuple[DirectionPrompts, DirectionSet]:
    """Directions from the train + extra prompts (unconditioned; harmful ones the policy refuses), kept to the
    prompts that behave as labelled (Arditi et al.), saved under `out/directions` with their prompt table."""
    src = rows[rows["split"].isin(["train", "extra"]) & (rows["condition"] == "")]
    src = src[(~src["harmful"]) | (src["category"] == "refuse")]
    src = src[src["source"] != "overrefusal"]
    labels = [label(n) if h else "" for n, h in zip(src["node"], src["harmful"], strict=True)]
    counts = pd.Series([x for x in labels if x]).value_counts()
    keep = [(not h) or counts.get(lab, 0) >= 2 for lab, h in zip(labels, src["harmful"], strict=True)]
    src = src[keep].reset_index(drop=True)
    labels = [lab for lab, k in zip(labels, keep, strict=True) if k]
    # per label, where at least 2 behave as labelled; a label the model never refuses keeps its prompts (its
    # direction then contrasts topics)
    behaves, _ = behaves_as_labelled(lm, list(src["prompt"]), list(src["harmful"].astype(bool)), max_new_tokens=8,
                                     batch_size=settings.batch_size, progress=settings.progress)
    kept, _ = behaviour_mask(behaves.tolist(), labels, min_keep=2)
    src = src[kept].reset_index(drop=True)
    labels = [lab for lab, k in zip(labels, kept, strict=True) if k]
    harmful_flags = list(src["harmful"].astype(bool))
    folder = out / "directions"
    acts = capture_activations(lm, list(src["prompt"]), layers=None, positions=list(positions),
                               batch_size=settings.batch_size, out_dir=folder / "activations",
                               progress=settings.progress)
    forms = request_forms(src["prompt"])
    ds = compute_directions(acts, labels, harmful_flags, meta={"organism": source, "level": level}, strata=forms)
    ds.save(folder)
    prompts = DirectionPrompts(acts, list(src["prompt"]), labels, harmful_flags, list(forms))
    prompts.save(folder)
    return prompts, ds


def _previous(out: Path, grid: Sequence[int], positions: Sequence[Position], starts: Sequence[int],
              n_layers: int) -> selection.Selection | None:
    """The pooled selection an earlier suite run scored in `out` on the same candidates and scopes, else None."""
    saved, record = out / files.SELECTION.name, out / files.SELECTION_JSON
    if not saved.is_file() or not record.is_file():
        return None
    previous = pd.read_parquet(saved)
    previous = previous[previous["node"] == POOLED]
    labels = [position_label(p) for p in positions]
    if sorted(set(previous["layer"])) != sorted(grid) or sorted(set(previous["position"])) != sorted(labels) or \
            not set(previous["ablate_from"]) - {0} <= set(starts):
        return None
    table, lay, lab, passed = selection.choose(previous.drop(columns=["chosen", "tier"]))
    old = json.loads(record.read_text(encoding="utf-8"))
    return selection.Selection(POOLED, lay, positions[labels.index(lab)], passed, table, old.get("baseline", {}),
                               int(table.loc[table["chosen"], "ablate_from"].iloc[0]), n_layers)
