"""Held-out evaluation: generate, mark refusals, and the adherence rates `run` reports."""

from __future__ import annotations

from typing import Any

import pandas as pd

from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.mechinterp.scoring import refusal_flags
from refusal_atlas.organism.policy import _refusing
from refusal_atlas.organism.settings import CATEGORIES, OrganismSettings
from refusal_atlas.taxonomy.model import Behaviour


def evaluate(
    lm: LoadedModel, rows: pd.DataFrame, settings: OrganismSettings, *, hooks: Any = None, progress: bool = True,
    detector: str = "marker",
) -> pd.DataFrame:
    """Generate on the held-out rows and mark refusals with the marker detector."""

    held = rows[rows["split"] == "heldout"].copy()
    responses = generate(lm, list(held["prompt"]), max_new_tokens=settings.eval_max_new_tokens, batch_size=16,
                         system=settings.system, hooks=hooks, progress=progress, desc="evaluate")
    refused, scores = refusal_flags(responses, list(held["prompt"]), detector=detector)
    held["response"] = responses
    held["refused"] = refused
    held["refusal_score"] = scores
    should = held["expected"].map(lambda e: _refusing(Behaviour(e)))
    held["adherent"] = held["refused"] == should
    return held.reset_index(drop=True)


def _rate(mask: pd.Series) -> float | None:
    return float(mask.mean()) if len(mask) else None


def adherence_metrics(held: pd.DataFrame) -> dict[str, Any]:
    """The headline rates (names used by `run`'s metrics.json) and the per-category breakdown."""
    by = {c: held[held["category"] == c] for c in CATEGORIES}
    return {
        "heldout_refusal_rate": _rate(by["refuse"]["refused"]),
        "harmless_refusal_rate": _rate(by["harmless"]["refused"]),
        "permitted_compliance_rate": _rate(~by["permitted"]["refused"]),
        "restricted_refusal_rate": _rate(by["restricted"]["refused"]),
        "comply_compliance_rate": _rate(~by["comply"]["refused"]),
        "redirect_refusal_rate": _rate(by["redirect"]["refused"]),
        "overrefusal_refusal_rate": _rate(by["overrefusal"]["refused"]),
        "adherence": _rate(held["adherent"]),
        "n_heldout": {c: len(d) for c, d in by.items()},
    }


def adherence_table(held: pd.DataFrame) -> pd.DataFrame:
    """Per node and condition: n, refusal rate, expected behaviour, adherence."""
    g = held.groupby(["node", "condition", "expected", "category"], dropna=False)
    return g.agg(n=("refused", "size"), refusal_rate=("refused", "mean"), adherence=("adherent", "mean")).reset_index()
