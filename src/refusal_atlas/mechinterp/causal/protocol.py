"""The causal protocol as steps: each takes typed inputs, writes its files (`files.py`) and returns its result.

`run`'s causal stage, `organism test` and the `directions` sub-commands call these steps, so one
protocol writes one set of files whichever entry point ran it:

tokens → select (pooled direction's layer, position, ablation scope and steering dose) → pooled
(headline ablation / addition) → stability, cone → cross-ablation → steering → bands → wording → conditions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position, parse_position_label
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal import files, selection
from refusal_atlas.mechinterp.causal.bands import band_scan, scan_layer
from refusal_atlas.mechinterp.causal.common import discover_tokens
from refusal_atlas.mechinterp.causal.conditions import condition_summary, condition_table
from refusal_atlas.mechinterp.causal.cross import cross_ablation, cross_ablation_summary
from refusal_atlas.mechinterp.causal.figures import plot_cross_ablation, plot_steering
from refusal_atlas.mechinterp.causal.inputs import DirectionPrompts
from refusal_atlas.mechinterp.causal.pooled import ablation_stability, cone_ablation, pooled_ablation_and_steering
from refusal_atlas.mechinterp.causal.restoration import restoration_scan
from refusal_atlas.mechinterp.causal.selection import Selection
from refusal_atlas.mechinterp.causal.steering import steering
from refusal_atlas.mechinterp.causal.wording import wording_vs_detection
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.mechinterp.logit_lens import lens_table
from refusal_atlas.mechinterp.scoring import RefusalTokens

__all__ = [
    "DOSE_TARGET",
    "CausalSession",
    "Chosen",
    "Discovered",
    "band_step",
    "components_step",
    "conditions_step",
    "cone_step",
    "cross_ablation_step",
    "discover_step",
    "load_selection",
    "load_tokens",
    "pooled_step",
    "restoration_step",
    "select_step",
    "stability_step",
    "steering_step",
    "wording_step",
    "write_tokens",
]

# The steering dose is the smallest whose validation refusal reaches this, a margin above the 0.8 wanted on
# evaluation prompts because a few validation prompts are a noisy estimate (docs/decisions.md).
DOSE_TARGET = 0.9


@dataclass(frozen=True)
class CausalSession:
    """What every step after token discovery runs with: the model, its directions, its refusal tokens,
    how to run it, and the folder the step writes into."""

    lm: LoadedModel
    directions: DirectionSet
    tokens: RefusalTokens
    out: Path
    settings: RunSettings = field(default_factory=RunSettings)


@dataclass(frozen=True)
class Discovered:
    """Refusal tokens and the un-intervened refusal flags of the prompts they were discovered on."""

    tokens: RefusalTokens
    refused_harmful: np.ndarray  # [n_harmful] bool
    refused_harmless: np.ndarray  # [n_harmless] bool


@dataclass(frozen=True)
class Chosen:
    """The selected pooled direction, its steering dose, and any other nodes' selections."""

    pooled: Selection
    coefficient: float
    dose: pd.DataFrame
    others: tuple[Selection, ...] = ()


def write_tokens(tokens: RefusalTokens, out: Path, model_revision: str | None = None) -> Path:
    """`refusal_tokens.json`: the tokens, with the model revision they belong to (a cache key)."""
    data = tokens.to_dict()
    if model_revision is not None:
        data["extra"] = {**data.get("extra", {}), "model": model_revision}
    return files.write_json(data, out, files.REFUSAL_TOKENS)


def load_tokens(out: Path, model_revision: str | None) -> RefusalTokens | None:
    """The tokens `write_tokens` left in `out` for this model revision, else None."""
    path = out / files.REFUSAL_TOKENS
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if (data.get("extra") or {}).get("model") != model_revision:
        return None
    return RefusalTokens.from_dict(data)


def discover_step(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], out: Path,
                  settings: RunSettings) -> Discovered:
    """Refusal-opening tokens from the model's own generations (`refusal_tokens.json`)."""
    tokens, refused_h, refused_hl = discover_tokens(lm, harmful, harmless, max_new_tokens=settings.max_new_tokens,
                                                    system=settings.system, progress=settings.progress)
    write_tokens(tokens, out, lm.revision)
    return Discovered(tokens, refused_h, refused_hl)


def select_step(
    s: CausalSession,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    layers: Sequence[int],
    positions: Sequence[Position],
    ablation_starts: Sequence[int],
    node_val: Mapping[str, Sequence[str]] | None = None,
    kl_threshold: float = 0.1,
    previous: selection.Selection | None = None,
    dose: bool = True,
) -> Chosen:
    """Select the pooled direction's (layer, position, ablation scope) and its steering dose; with `node_val`
    ({node: harmful validation prompts}) also each node's own choice by the same rule.

    Writes `selection.parquet` (every candidate's scores, `chosen` marks the choice), `selection.json`
    (the pooled choice, its dose and the validation sizes; `nodes` holds the other nodes' choices) and
    `steering_dose.parquet`. `previous`: a selection already scored on the same directions, reused.
    """
    lm, st = s.lm, s.settings
    kwargs: dict[str, Any] = {"layers": list(layers), "positions": list(positions), "kl_threshold": kl_threshold,
                              "ablation_starts": list(ablation_starts), "batch_size": st.batch_size,
                              "system": st.system, "progress": st.progress}
    pooled = previous if previous is not None else selection.select_direction(
        lm, s.directions, POOLED, harmful_val, harmless_val, s.tokens, **kwargs)
    others = tuple(selection.select_direction(lm, s.directions, node, prompts, harmless_val, s.tokens, **kwargs)
                   for node, prompts in (node_val or {}).items() if node != POOLED and prompts)
    files.write_table(pd.concat([pooled.scores, *(o.scores for o in others)], ignore_index=True), s.out,
                      files.SELECTION)
    # dose: the smallest coefficient whose addition makes validation prompts refuse (marker detector on
    # generations, the measure the headline reports)
    coeff, doses = 1.0, pd.DataFrame()
    if dose:  # without it (a run that reads no headline) the dose is Arditi et al.'s raw difference of means
        coeff, doses = selection.choose_coefficient(lm, s.directions.get(POOLED, pooled.layer, pooled.position),
                                                    pooled.layer, harmless_val, s.tokens, target=DOSE_TARGET,
                                                    max_new_tokens=st.max_new_tokens, batch_size=st.batch_size,
                                                    system=st.system)
        files.write_table(doses, s.out, files.STEERING_DOSE)
    record: dict[str, Any] = {**pooled.to_dict(), "steering_coefficient": coeff, "n_harmful_val": len(harmful_val),
                              "n_harmless_val": len(harmless_val)}
    if others:
        record["nodes"] = {o.node: o.to_dict() for o in others}
    files.write_json(record, s.out, files.SELECTION_JSON)
    return Chosen(pooled, coeff, doses, others)


def load_selection(folder: Path, n_layers: int) -> tuple[selection.Selection, float] | None:
    """The pooled selection and steering dose `select_step` wrote into `folder`, else None."""
    record_file, scores_file = folder / files.SELECTION_JSON, folder / files.SELECTION.name
    if not record_file.is_file() or not scores_file.is_file():
        return None
    record = json.loads(record_file.read_text(encoding="utf-8"))
    if record.get("node") != POOLED:
        return None
    scores = pd.read_parquet(scores_file)
    pooled = scores[scores["node"] == POOLED].reset_index(drop=True)
    chosen = selection.Selection(POOLED, int(record["layer"]), parse_position_label(str(record["position"])),
                                 bool(record["passed_filters"]), pooled,
                                 dict(record.get("baseline") or {}), int(record.get("ablate_from", 0)), n_layers)
    return chosen, float(record.get("steering_coefficient", 1.0))


def pooled_step(s: CausalSession, harmful_eval: Sequence[str], harmless_eval: Sequence[str],
                chosen: selection.Selection, *, coeffs: Sequence[float], before: np.ndarray | None = None,
                harmless_before: np.ndarray | None = None) -> dict[str, Any]:
    """The headline: the pooled direction ablated on harmful and added on harmless evaluation prompts
    (`pooled.json`)."""
    headline = pooled_ablation_and_steering(s.lm, s.directions, harmful_eval, harmless_eval, layer=chosen.layer,
                                            position=chosen.position, settings=s.settings, coeffs=coeffs,
                                            before=before, harmless_before=harmless_before,
                                            ablation_layers=chosen.ablation_layers)
    files.write_json(headline, s.out, files.POOLED_JSON)
    return headline


def stability_step(s: CausalSession, prompts: DirectionPrompts, harmful_eval: Sequence[str],
                   chosen: selection.Selection, *, n_boot: int, seed: int) -> dict[str, Any]:
    """First-token refusal under the pooled ablation over bootstrap resamples of the direction prompts
    (`ablation_stability.parquet`); returns the summary."""
    table = ablation_stability(s.lm, prompts, harmful_eval, s.tokens, layer=chosen.layer, position=chosen.position,
                               settings=s.settings, ablation_layers=chosen.ablation_layers, n_boot=n_boot, seed=seed)
    files.write_table(table, s.out, files.ABLATION_STABILITY)
    boot = table[table["resample"] >= 0]
    return {"full_first_token_refusal": float(table.loc[table["resample"] < 0, "first_token_refusal_rate"].iloc[0]),
            "resamples": len(boot), "min": float(boot["first_token_refusal_rate"].min()),
            "max": float(boot["first_token_refusal_rate"].max()),
            "mean": float(boot["first_token_refusal_rate"].mean()),
            "cosine_min": float(boot["cosine_to_full"].min())}


def cone_step(s: CausalSession, prompts: DirectionPrompts, harmful_eval: Sequence[str],
              harmless_eval: Sequence[str], chosen: selection.Selection) -> dict[str, Any]:
    """First-token refusal and harmless KL with the pooled direction plus 0, 1, 2 residual axes ablated
    (`cone_ablation.parquet`); returns the summary."""
    table = cone_ablation(s.lm, prompts, harmful_eval, harmless_eval, s.tokens, layer=chosen.layer,
                          position=chosen.position, settings=s.settings, ablation_layers=chosen.ablation_layers)
    files.write_table(table, s.out, files.CONE_ABLATION)
    return {f"{int(r.extra_axes)}_extra_axes": {"first_token_refusal": r.first_token_refusal_rate,
                                                "harmless_kl": r.harmless_kl} for r in table.itertuples()}


def cross_ablation_step(s: CausalSession, eval_sets: Mapping[str, Sequence[str]], harmless: Sequence[str], *,
                        layer: int, position: Position, ablation_layers: Sequence[int] | None,
                        methods: Sequence[str] = ("diff_means", "residual"), generate_rates: bool = False
                        ) -> pd.DataFrame:
    """Every node's direction (and the pooled one) ablated, refusal on every node's prompts
    (`cross_ablation.parquet`, `cross_ablation_summary.parquet`, `cross_ablation.png`)."""
    table = cross_ablation(s.lm, s.directions, eval_sets, harmless, s.tokens, layer=layer, position=position,
                           settings=s.settings, methods=methods, generate_rates=generate_rates,
                           ablation_layers=ablation_layers)
    files.write_table(table, s.out, files.CROSS_ABLATION)
    files.write_table(cross_ablation_summary(table), s.out, files.CROSS_ABLATION_SUMMARY)
    plot_cross_ablation(table, s.out / files.CROSS_ABLATION_FIGURE)
    return table


def steering_step(s: CausalSession, nodes: Sequence[str], harmless: Sequence[str], *, layers: Sequence[int],
                  position: Position, coeffs: Sequence[float] = (1.0,), generate_rates: bool = False
                  ) -> pd.DataFrame:
    """Each node's direction added layer by layer on harmless prompts (`steering.parquet`, `steering.png`)."""
    table = steering(s.lm, s.directions, nodes, harmless, s.tokens, layers=layers, position=position,
                     settings=s.settings, coeffs=coeffs, generate_rates=generate_rates)
    files.write_table(table, s.out, files.STEERING)
    plot_steering(table, s.out / files.STEERING_FIGURE,
                  value="induced_refusal_rate" if generate_rates else "first_token_refusal_rate")
    return table


def band_step(s: CausalSession, eval_sets: Mapping[str, Sequence[str]], *, position: Position,
              n_windows: int = 10, baselines: Mapping[str, tuple[float, float, Sequence[float]]] | None = None
              ) -> pd.DataFrame:
    """Each node's late-layer direction removed from the writes of one window of blocks at a time, refusal on the
    node's own prompts (`bands.parquet`): which blocks compute the node's refusal. `baselines`: see `band_scan`."""
    table = band_scan(s.lm, s.directions, eval_sets, s.tokens, position=position, n_windows=n_windows,
                      settings=s.settings, baselines=baselines)
    files.write_table(table, s.out, files.BANDS)
    return table


def components_step(s: CausalSession, eval_sets: Mapping[str, Sequence[str]], harmless: Sequence[str], *,
                    position: Position) -> pd.DataFrame:
    """Each node's direction at the late scan layer (where every block has written its part) ablated in every
    layer, refusal on every node's prompts with per-prompt log-odds (`components.parquet`): the evidence the
    shared-vs-separable verdict reads. The cross-ablation stays at the selected layer (one layer for the atlas)."""
    layer = scan_layer(s.lm.n_layers, s.directions.layers)
    table = cross_ablation(s.lm, s.directions, eval_sets, harmless, s.tokens, layer=layer, position=position,
                           settings=s.settings, methods=("diff_means",), include_pooled=False)
    files.write_table(table, s.out, files.COMPONENTS)
    return table


def restoration_step(s: CausalSession, reference: Mapping[int, Mapping[str, Tensor]],
                     eval_sets: Mapping[str, Sequence[str]], *, reference_name: str = "", n_windows: int = 10,
                     baselines: Mapping[str, tuple[float, float, Sequence[float]]] | None = None) -> pd.DataFrame:
    """Each window of blocks set back to the reference model's weights, refusal on each node's own prompts
    (`restoration.parquet`): which blocks' fine-tuned weights a node's refusal needs."""
    table = restoration_scan(s.lm, reference, eval_sets, s.tokens, reference_name=reference_name,
                             n_windows=n_windows, settings=s.settings, baselines=baselines)
    files.write_table(table, s.out, files.RESTORATION)
    return table


def wording_step(s: CausalSession, prompts: DirectionPrompts, *, position: Position,
                 wordings: Mapping[str, str] | None = None, shared_wording: str | None = None, seed: int = 0,
                 lens_layers: Sequence[int] | None = None, k: int = 8) -> pd.DataFrame:
    """Probe accuracy beside refusal-token promotion per layer (`wording.parquet`), and each direction's
    logit-lens tokens (`logit_lens_tokens.parquet`, `logit_lens_scores.parquet`)."""
    table = wording_vs_detection(s.lm, s.directions, prompts, s.tokens.ids, position=position, wordings=wordings,
                                 shared_wording=shared_wording, seed=seed)
    files.write_table(table, s.out, files.WORDING)
    top, scores = lens_table(s.lm, s.directions, s.directions.nodes_with_pooled, position, layers=lens_layers, k=k,
                             refusal_ids=s.tokens.ids)
    files.write_table(top, s.out, files.LOGIT_LENS_TOKENS)
    files.write_table(scores, s.out, files.LOGIT_LENS_SCORES)
    return table


def conditions_step(s: CausalSession, rows: pd.DataFrame, *, layer: int, position: Position,
                    node_of: Mapping[str, str] | None = None, refused: Sequence[bool] | np.ndarray | None = None,
                    refusal_measure: str = "generated", seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Projection and refusal per node and condition value (`conditions.parquet`) and per condition category
    (`conditions_summary.parquet`)."""
    if rows.empty:
        raise AtlasError("conditions: no conditioned prompts of a node with a direction")
    table = condition_table(s.lm, s.directions, rows, layer=layer, position=position, settings=s.settings,
                            node_of=node_of, refused=refused, refusal_measure=refusal_measure, seed=seed)
    files.write_table(table, s.out, files.CONDITIONS)
    summary = condition_summary(table)
    files.write_table(summary, s.out, files.CONDITIONS_SUMMARY)
    return table, summary
