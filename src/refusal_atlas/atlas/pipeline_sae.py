"""The `sae` stage of `run` wired to the run's files: the causal stage's layer and refusal tokens, the
directions at that layer, the run's prompt sets and the model's own answers (`sae_stage.run_sae_stage`).

The layer is the one the causal stage selected for the pooled direction; where the causal stage found
no refusal to test (a model that never refuses), the direction layer nearest two thirds of the depth,
and features are then chosen by decoder cosine alone (the stage record says so).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import pandas as pd

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.pipeline_causal import REFUSAL_POSITION
from refusal_atlas.atlas.runconfig import RunConfig, evaluation_rows, model_prompts
from refusal_atlas.atlas.sae_stage import STAGE_VERSION, SaeSettings, inputs_from_prompts, run_sae_stage
from refusal_atlas.atlas.stages import StageContext
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.mechinterp.causal.protocol import load_tokens
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet

__all__ = ["sae_params", "sae_settings", "stage_sae"]


def sae_settings(cfg: RunConfig) -> SaeSettings:
    """The stage's settings: quick or default, then `RunConfig.extra["sae"]` overrides."""
    settings = SaeSettings.quick() if cfg.quick else SaeSettings()
    return replace(settings, **cfg.extra.get("sae", {}))


def sae_params(cfg: RunConfig) -> dict[str, Any]:
    """What the stage's cache key adds to the run's: its code version and its settings."""
    return {"sae_version": STAGE_VERSION, "sae_settings": asdict(sae_settings(cfg))}


def _layer(ctx: StageContext, ds: DirectionSet, n_layers: int, override: int | None = None) -> int:
    """The block the SAE reads: `override` (SaeSettings.layer) if given, else the causal stage's layer."""
    if override is not None:
        if override not in ds.layers:
            raise AtlasError(f"sae layer {override}: no directions there (layers {ds.layers[0]}-{ds.layers[-1]})")
        return override
    chosen = ctx.results.get("causal", {}).get("layer")
    if isinstance(chosen, int) and chosen in ds.layers:
        return chosen
    return min(ds.layers, key=lambda layer: (abs(layer - 2 * n_layers / 3), layer))


def _answers(ctx: StageContext, n: int, seed: int) -> list[tuple[str, str]]:
    """(instruction, the model's own reply) pairs from the collected responses, a seeded sample."""
    path = ctx.out / schema.RESPONSES.path
    if n <= 0 or not path.is_file():
        return []
    df = pd.read_parquet(path, columns=["prompt", "response"]).dropna()
    df = df[df["response"].astype(str).str.strip() != ""]
    df = df.sample(n=min(n, len(df)), random_state=seed) if len(df) else df
    return list(zip(df["prompt"].astype(str), df["response"].astype(str), strict=True))


def stage_sae(cfg: RunConfig, ctx: StageContext, lm: LoadedModel) -> dict[str, Any]:
    s = sae_settings(cfg)
    ds = DirectionSet.load(ctx.out / schema.DIRECTIONS_DIR)
    nodes = [n for n in ds.nodes if n != POOLED]
    layer = _layer(ctx, ds, lm.n_layers, s.layer)
    directions = {n: ds.get(n, layer, REFUSAL_POSITION) for n in nodes}
    found = load_tokens(ctx.out / schema.CAUSAL_DIR, lm.revision)
    prompts = model_prompts(ctx.out, cfg)
    held_out = set(evaluation_rows(prompts, ctx.out)["prompt"])
    inputs = inputs_from_prompts(prompts, nodes, found.ids if found is not None else [], per_node=s.per_node,
                                 per_node_eval=s.per_node_eval, n_harmless=s.n_harmless,
                                 n_harmless_eval=s.n_harmless_eval, seed=cfg.seed, held_out=held_out)
    inputs.answers = _answers(ctx, s.n_answers, cfg.seed)
    pooled = ds.get(POOLED, layer, REFUSAL_POSITION)  # every harmful prompt minus harmless: the refusal direction
    return run_sae_stage(ctx.out, lm, directions, layer, inputs, s, refusal_direction=pooled, progress=cfg.progress)
