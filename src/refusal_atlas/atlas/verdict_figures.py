"""The figures a verdict is decided on, read once from an atlas folder into plain tables.

Why a separate layer: the decision rules are tested on synthetic tables with planted answers, so
they must not depend on how a stage names its files. `read_figures` is the one place that knows
the atlas folder's file names and columns (listed in `SOURCES`); everything else sees `Figures`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.errors import AtlasError

POOLED_SOURCE = "@pooled"
NO_ABLATION = "none"

# file -> the columns or keys the verdict engine reads (the contract with the pipeline's writers)
SOURCES: dict[str, tuple[str, ...]] = {
    "causal/cross_ablation.parquet": ("source", "method", "target", "n", "first_token_refusal_rate"),
    "causal/steering.parquet": ("node", "layer", "coeff", "method", "n", "first_token_refusal_rate",
                                "first_token_refusal_rate_baseline"),
    "causal/components.parquet": ("source", "method", "target", "n", "first_token_refusal_rate",
                                  "prompt_logit_scores"),
    "causal/bands.parquet": ("node", "kind", "block_lo", "block_hi", "n", "first_token_refusal_rate",
                             "first_token_refusal_rate_baseline"),
    "causal/restoration.parquet": ("node", "block_lo", "block_hi", "n", "first_token_refusal_rate",
                                   "first_token_refusal_rate_baseline", "prompt_logit_scores",
                                   "prompt_logit_scores_baseline"),
    "causal/wording.parquet": ("layer", "probe_accuracy", "probe_chance", "refusal_token_z_mean",
                               "own_wording_z_mean", "n_nodes"),
    "causal/conditions.parquet": ("node", "condition", "n", "refusal_rate"),
    "causal/skipped.json": ("reason",),
    "overlap/overlap.json": ("pairs[].a", "pairs[].b", "pairs[].cos", "pairs[].ci_low", "pairs[].ci_high",
                             "pairs[].floor_a", "pairs[].floor_b"),
    "directions/directions.json": ("auroc.{node}.{position}[layer]", "n_prompts.{node}"),
}


@dataclass
class Figures:
    """Every measured figure a rule may read; an absent table is an empty frame (the rule then abstains).

    cross:    source, target, rate, n [, odds] — first-token refusal on `target`'s eval prompts with
              `source`'s direction ablated (source "none": no ablation, the baseline); `odds`, where measured,
              the per-prompt refusal log-odds in one prompt order. From the components table (each node's
              direction at the late scan layer) when there is one, else from the cross-ablation.
    cosines:  a, b, cos, ci_low, ci_high, floor — the pair's cosine, its bootstrap CI and the lower of
              the two split-half reliabilities (the cosine two noisy copies of one direction reach)
    layers:   node, layer, layer_hi, kind, rate, baseline, n — kind "add": refusal of harmless prompts with
              the node's direction added at `layer` (layer_hi = layer); kind "ablate": refusal of the node's
              own prompts with its direction removed from the writes of blocks layer..layer_hi;
              "ablate_all": from the writes of every block; "restore": blocks layer..layer_hi set back to
              the reference model's weights, with `odds` / `odds_base` the per-prompt refusal log-odds
    decodable: node, layer, auroc, n — how well the node's direction separates its prompts from
              harmless ones at each layer
    wording:  node ("(all)" when pooled over nodes), layer, probe_accuracy, probe_chance, wording_z
    conditions: node, condition, n, rate — first-token refusal under a framing ("(none)": unframed,
              "control=…": a framing of the same length that states nothing)
    """

    cross: pd.DataFrame = field(default_factory=pd.DataFrame)
    cosines: pd.DataFrame = field(default_factory=pd.DataFrame)
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    decodable: pd.DataFrame = field(default_factory=pd.DataFrame)
    wording: pd.DataFrame = field(default_factory=pd.DataFrame)
    conditions: pd.DataFrame = field(default_factory=pd.DataFrame)
    harm: list[dict[str, Any]] = field(default_factory=list)  # the harm stage's per-node findings rows
    skipped: str | None = None  # why the causal stage found nothing to ablate (the model does not refuse)
    n_layers: int | None = None


@dataclass
class FindingText:
    """What every finding says in words: the question, its subject, the verdict and the rule behind it."""

    question: str
    title: str
    subject: str
    verdict: str
    sentence: str
    rule: str
    rule_text: str


@dataclass
class Finding(FindingText):
    """One answered question, in the shape of findings.json."""

    value: float | None = None
    ci: tuple[float, float] | None = None
    n: int | None = None
    trusted: bool = False
    evidence: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "title": self.title, "subject": self.subject, "verdict": self.verdict,
                "sentence": self.sentence, "rule": self.rule, "rule_text": self.rule_text,
                "value": _finite(self.value), "ci": [_finite(self.ci[0]), _finite(self.ci[1])] if self.ci else None,
                "n": self.n, "trusted": self.trusted, "evidence": self.evidence}


def _finite(x: float | None) -> float | None:
    """JSON has no NaN: a missing figure is null."""
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


# ------------------------------------------------------------------------------------------------
# Intervals
# ------------------------------------------------------------------------------------------------

Z95 = 1.959963984540054


def wilson(rate: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at n = 1 and at rates of 0 or 1, unlike rate ± 2se)."""
    if n <= 0 or not math.isfinite(rate):
        return (math.nan, math.nan)
    z2 = Z95 * Z95
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def difference_ci(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
    """95% Newcombe (hybrid Wilson) interval of p1 - p2 for two proportions."""
    l1, u1 = wilson(p1, n1)
    l2, u2 = wilson(p2, n2)
    if any(math.isnan(x) for x in (l1, u1, l2, u2)):
        return (math.nan, math.nan)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def ratio_bootstrap(num: tuple[float, int, float, int], den: tuple[float, int, float, int], *, n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, tuple[float, float]]:
    """(a - b) / (c - d) for rates given as (a, n_a, b, n_b), (c, n_c, d, n_d), with a 95% parametric
    bootstrap interval (each rate redrawn from its binomial; seeded, so the interval is reproducible)."""
    rng = np.random.default_rng(seed)

    def draw(p: float, n: int) -> np.ndarray:
        return rng.binomial(n, min(max(p, 0.0), 1.0), size=n_boot) / n

    a, na, b, nb = num
    c, nc, d, nd = den
    point_den = c - d
    point = (a - b) / point_den if point_den != 0 else math.nan
    dens = draw(c, nc) - draw(d, nd)
    nums = draw(a, na) - draw(b, nb)
    ok = np.abs(dens) > 1e-9
    if ok.sum() < n_boot // 2:
        return point, (math.nan, math.nan)
    ratios = nums[ok] / dens[ok]
    return point, (float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975)))


def paired_mean_drop(before: np.ndarray, after: np.ndarray, *, n_boot: int = 2000, seed: int = 0
                     ) -> tuple[float, tuple[float, float]]:
    """mean(before - after) over the same prompts, with a 95% percentile bootstrap interval over prompts
    (seeded). NaN interval for fewer than two prompts."""
    d = np.asarray(before, dtype=float) - np.asarray(after, dtype=float)
    if len(d) < 2:
        return (float(d.mean()) if len(d) else math.nan), (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return float(d.mean()), (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def paired_ratio(before: np.ndarray, cross: np.ndarray, own: np.ndarray, *, n_boot: int = 2000, seed: int = 0
                 ) -> tuple[float, tuple[float, float]]:
    """mean(before - cross) / mean(before - own) over the same prompts (per-prompt scores in one order), with a
    95% percentile bootstrap interval over prompts (seeded). Resamples whose denominator is not positive are
    dropped; fewer than half left gives a NaN interval."""
    b, c, o = (np.asarray(x, dtype=float) for x in (before, cross, own))
    den = float((b - o).mean())
    point = float((b - c).mean()) / den if den > 0 else math.nan
    if len(b) < 2:
        return point, (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b), size=(n_boot, len(b)))
    nums, dens = (b - c)[idx].mean(axis=1), (b - o)[idx].mean(axis=1)
    ok = dens > 1e-9
    if ok.sum() < n_boot // 2:
        return point, (math.nan, math.nan)
    ratios = nums[ok] / dens[ok]
    return point, (float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975)))


# ------------------------------------------------------------------------------------------------
# Reading an atlas folder
# ------------------------------------------------------------------------------------------------


def _parquet(path: Path, need: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    df = pd.read_parquet(path)
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise AtlasError(f"{path}: lacks column(s) {missing} that the verdicts read; rerun `refusal-atlas run`")
    return df


def read_figures(atlas: Path) -> Figures:
    """The figures of an atlas folder (files and columns: `SOURCES`); absent files give empty tables."""
    atlas = Path(atlas)
    fig = Figures()
    harm = atlas / "harm" / "findings.json"
    if harm.is_file():
        rows = json.loads(harm.read_text(encoding="utf-8"))
        fig.harm = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    skipped = atlas / "causal" / "skipped.json"
    if skipped.is_file():
        fig.skipped = str(json.loads(skipped.read_text()).get("reason", "no refusal"))
    cross = _parquet(atlas / "causal" / "components.parquet", SOURCES["causal/components.parquet"])
    if cross.empty:
        cross = _parquet(atlas / "causal" / "cross_ablation.parquet", SOURCES["causal/cross_ablation.parquet"])
    if len(cross):
        cross = cross[cross["method"].isin(["diff_means", "none"])]
        fig.cross = pd.DataFrame({"source": cross["source"].astype(str), "target": cross["target"].astype(str),
                                  "rate": cross["first_token_refusal_rate"].astype(float),
                                  "n": cross["n"].astype(int)}).reset_index(drop=True)
        if "prompt_logit_scores" in cross:
            fig.cross["odds"] = [np.asarray(v, dtype=float) for v in cross["prompt_logit_scores"]]
    steer = _parquet(atlas / "causal" / "steering.parquet", SOURCES["causal/steering.parquet"])
    if len(steer):
        steer = steer[(steer["method"] == "diff_means") & (steer["node"] != POOLED_SOURCE)]
        # the smallest tested coefficient: the dose every layer is compared at
        steer = steer[steer["coeff"] == steer["coeff"].min()]
        fig.layers = pd.DataFrame({"node": steer["node"].astype(str), "layer": steer["layer"].astype(int),
                                   "layer_hi": steer["layer"].astype(int),
                                   "kind": "add", "rate": steer["first_token_refusal_rate"].astype(float),
                                   "baseline": steer["first_token_refusal_rate_baseline"].astype(float),
                                   "n": steer["n"].astype(int)}).reset_index(drop=True)
    bands = _parquet(atlas / "causal" / "bands.parquet", SOURCES["causal/bands.parquet"])
    if len(bands):
        scan = pd.DataFrame({"node": bands["node"].astype(str), "layer": bands["block_lo"].astype(int),
                             "layer_hi": bands["block_hi"].astype(int),
                             "kind": ["ablate" if k == "window" else "ablate_all" for k in bands["kind"]],
                             "rate": bands["first_token_refusal_rate"].astype(float),
                             "baseline": bands["first_token_refusal_rate_baseline"].astype(float),
                             "n": bands["n"].astype(int)})
        fig.layers = pd.concat([fig.layers, scan], ignore_index=True) if len(fig.layers) else scan
    restore = _parquet(atlas / "causal" / "restoration.parquet", SOURCES["causal/restoration.parquet"])
    if len(restore):
        scan = pd.DataFrame({"node": restore["node"].astype(str), "layer": restore["block_lo"].astype(int),
                             "layer_hi": restore["block_hi"].astype(int), "kind": "restore",
                             "rate": restore["first_token_refusal_rate"].astype(float),
                             "baseline": restore["first_token_refusal_rate_baseline"].astype(float),
                             "n": restore["n"].astype(int),
                             "odds": [np.asarray(v, dtype=float) for v in restore["prompt_logit_scores"]],
                             "odds_base": [np.asarray(v, dtype=float)
                                           for v in restore["prompt_logit_scores_baseline"]]})
        fig.layers = pd.concat([fig.layers, scan], ignore_index=True) if len(fig.layers) else scan
    wording = _parquet(atlas / "causal" / "wording.parquet", SOURCES["causal/wording.parquet"])
    if len(wording):
        node = wording["node"].astype(str) if "node" in wording else "(all)"
        fig.wording = pd.DataFrame({"node": node, "layer": wording["layer"].astype(int),
                                    "probe_accuracy": wording["probe_accuracy"].astype(float),
                                    "probe_chance": wording["probe_chance"].astype(float),
                                    "wording_z": wording["own_wording_z_mean"].astype(float)
                                    .fillna(wording["refusal_token_z_mean"].astype(float))})
    cond = _parquet(atlas / "causal" / "conditions.parquet", SOURCES["causal/conditions.parquet"])
    if len(cond):
        fig.conditions = pd.DataFrame({"node": cond["node"].astype(str), "condition": cond["condition"].astype(str),
                                       "n": cond["n"].astype(int), "rate": cond["refusal_rate"].astype(float)})
    overlap = atlas / "overlap" / "overlap.json"
    if overlap.is_file():
        pairs = json.loads(overlap.read_text()).get("pairs", [])
        fig.cosines = pd.DataFrame([{"a": p["a"], "b": p["b"], "cos": float(p["cos"]), "ci_low": float(p["ci_low"]),
                                     "ci_high": float(p["ci_high"]),
                                     "floor": float(min(p["floor_a"], p["floor_b"]))} for p in pairs])
    directions = atlas / "directions" / "directions.json"
    if directions.is_file():
        meta = json.loads(directions.read_text())
        fig.n_layers = meta.get("n_model_layers")
        layers = meta.get("layers", [])
        rows = []
        for node, by_pos in (meta.get("auroc") or {}).items():
            values: list[float] = by_pos.get("-1") or next(iter(by_pos.values()), [])
            for layer, auc in zip(layers, values, strict=False):
                rows.append({"node": node, "layer": int(layer), "auroc": float(auc),
                             "n": int((meta.get("n_prompts") or {}).get(node, 0))})
        fig.decodable = pd.DataFrame(rows)
    return fig
