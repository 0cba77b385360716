"""The run's answering stages: harmfulness vs refusal (the 2×2), then the verdicts over every figure.

`harm` reads the corpus the detector labelled plus held-out evaluation prompts and writes `harm/`;
`verdicts` decides each question with its named rule and writes `findings.json`. A rule counts as
trusted only if it is listed in the shipped `validation.json` (written by `refusal-atlas validate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas import paths
from refusal_atlas.atlas import schema
from refusal_atlas.atlas.harm_rows import direction_capture
from refusal_atlas.atlas.harm_stage import HarmSettings, harm_table, run_harm_stage
from refusal_atlas.atlas.runconfig import RunConfig, evaluation_rows, model_prompts, organism_trained, run_taxonomy
from refusal_atlas.atlas.stages import StageContext
from refusal_atlas.atlas.verdicts import load_trusted_rules, write_findings
from refusal_atlas.lm.models import LoadedModel

__all__ = ["shipped_validation", "stage_harm", "stage_verdicts"]


def shipped_validation() -> Path | None:
    """The validation record shipped with the package (None before any `validate` run was committed)."""
    path = paths.data_dir() / "validation.json"
    return path if path.is_file() else None


def stage_harm(cfg: RunConfig, ctx: StageContext, lm: LoadedModel) -> dict[str, Any]:
    corpus = pd.read_parquet(ctx.out / schema.CORPUS.path)
    table = harm_table(corpus, evaluation_rows(model_prompts(ctx.out, cfg), ctx.out), seed=cfg.seed)
    settings = HarmSettings.quick() if cfg.quick else HarmSettings()
    # the directions stage's prompts join the harm table with the activations it captured (no second pass)
    reuse = direction_capture(ctx.out, lm, exclude=organism_trained(ctx.out))
    return run_harm_stage(ctx.out, lm, table, run_taxonomy(cfg), cfg.seed, settings=settings, reuse=reuse,
                          progress=cfg.progress, console=ctx.console)


def stage_verdicts(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return write_findings(ctx.out, load_trusted_rules(shipped_validation()))
