"""The files every causal step writes: one name and one column list per table, one writer.

`run`'s causal stage, `organism test` and the `directions` sub-commands all write through
`write_table` / `write_json`, so a table has the same name and columns whichever ran it; the atlas
schema (`refusal_atlas.atlas.schema`) imports these declarations rather than repeating them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ABLATION_STABILITY",
    "BANDS",
    "COMPONENTS",
    "CONDITIONS",
    "CONDITIONS_SUMMARY",
    "CONE_ABLATION",
    "CROSS_ABLATION",
    "CROSS_ABLATION_FIGURE",
    "CROSS_ABLATION_SUMMARY",
    "DIRECTION_PROMPTS",
    "JSON_FILES",
    "LOGIT_LENS_SCORES",
    "LOGIT_LENS_TOKENS",
    "POOLED_JSON",
    "REFUSAL_TOKENS",
    "RESTORATION",
    "SCANS",
    "SELECTION",
    "SELECTION_JSON",
    "SKIPPED",
    "STEERING",
    "STEERING_DOSE",
    "STEERING_FIGURE",
    "SUITE_METRICS",
    "TABLES",
    "WORDING",
    "TableSpec",
    "write_figure",
    "write_json",
    "write_table",
]


@dataclass(frozen=True)
class TableSpec:
    """A table's file name and its columns, in order.

    `optional` columns may be absent (a writer that has no such information); `prefixed` columns come
    one per node after the fixed ones (`loading:<node>`).
    """

    name: str
    columns: tuple[str, ...]
    optional: tuple[str, ...] = ()
    prefixed: tuple[str, ...] = ()

    def check(self, df: pd.DataFrame) -> None:
        """Raise when a writer's frame drifts from the declared columns (a bug, not bad input)."""
        fixed = [str(c) for c in df.columns if not any(str(c).startswith(p) for p in self.prefixed)]
        expected = [c for c in self.columns if c in fixed or c not in self.optional]
        if fixed != expected:
            raise AtlasError(f"{self.name}: columns {fixed} differ from the declared {list(self.columns)}")


SELECTION = TableSpec("selection.parquet", (
    "node", "layer", "position", "method", "ablate_from", "bypass_score", "induce_score", "kl", "kl_all", "norm",
    "filtered", "chosen", "tier"))
STEERING_DOSE = TableSpec("steering_dose.parquet", (
    "coefficient", "layer", "n", "first_token_refusal_rate", "logit_score", "kl_vs_clean", "refusal_rate",
    "measure", "chosen"), optional=("refusal_rate",))
ABLATION_STABILITY = TableSpec("ablation_stability.parquet", (
    "resample", "layer", "position", "n", "first_token_refusal_rate", "logit_score", "cosine_to_full"))
CONE_ABLATION = TableSpec("cone_ablation.parquet", (
    "extra_axes", "layer", "position", "n", "first_token_refusal_rate", "logit_score", "harmless_kl",
    "singular_value"), prefixed=("loading:",))
CROSS_ABLATION = TableSpec("cross_ablation.parquet", (
    "source", "method", "target", "n", "logit_score", "first_token_refusal_rate", "refusal_rate", "harmless_kl",
    "layer", "position", "logit_score_baseline", "first_token_refusal_rate_baseline", "refusal_rate_baseline",
    "self", "prompt_logit_scores"), optional=("prompt_logit_scores",))
CROSS_ABLATION_SUMMARY = TableSpec("cross_ablation_summary.parquet", (
    "source", "method", "own", "others", "all", "harmless_kl"))
STEERING = TableSpec("steering.parquet", (
    "node", "layer", "coeff", "position", "method", "n", "norm", "logit_score", "logit_score_baseline",
    "first_token_refusal_rate", "first_token_refusal_rate_baseline", "induced_refusal_rate"))
# each node's direction removed from the writes of one window of blocks (`bands.py`); kind "all": every block.
BANDS = TableSpec("bands.parquet", (
    "node", "kind", "block_lo", "block_hi", "scan_layer", "position", "n", "first_token_refusal_rate",
    "first_token_refusal_rate_baseline", "logit_score", "logit_score_baseline", "prompt_logit_scores",
    "prompt_logit_scores_baseline"), optional=("prompt_logit_scores", "prompt_logit_scores_baseline"))
# the verdict's component comparison: each node's direction at the late scan layer ablated in every layer,
# refusal (per-prompt log-odds) on every node's prompts — the cross-ablation's columns
COMPONENTS = TableSpec("components.parquet", CROSS_ABLATION.columns, optional=CROSS_ABLATION.optional)
# each window of blocks restored to a reference model's weights (`restoration.py`)
RESTORATION = TableSpec("restoration.parquet", (
    "node", "block_lo", "block_hi", "n", "first_token_refusal_rate", "first_token_refusal_rate_baseline",
    "logit_score", "logit_score_baseline", "reference", "prompt_logit_scores", "prompt_logit_scores_baseline"))
CONDITIONS = TableSpec("conditions.parquet", (
    "node", "condition", "n", "expected", "category", "projection", "projection_ci_low", "projection_ci_high",
    "pooled_projection", "refusal_rate", "refusal_ci_low", "refusal_ci_high", "projection_delta", "refusal_delta",
    "refusal_measure"))
CONDITIONS_SUMMARY = TableSpec("conditions_summary.parquet", (
    "category", "n_node_conditions", "projection_delta", "projection_delta_ci_low", "projection_delta_ci_high",
    "refusal_delta", "refusal_delta_ci_low", "refusal_delta_ci_high"))
WORDING = TableSpec("wording.parquet", (
    "layer", "position", "probe_accuracy", "probe_chance", "refusal_token_z_mean", "pooled_refusal_token_z",
    "own_wording_z_mean", "n_nodes"))
LOGIT_LENS_TOKENS = TableSpec("logit_lens_tokens.parquet", ("node", "layer", "sign", "rank", "token_id", "token", "z"))
LOGIT_LENS_SCORES = TableSpec("logit_lens_scores.parquet", ("node", "layer", "refusal_token_z", "top_tokens"))
# The direction prompts beside a direction folder: which prompt fed which group, and its request form
# (the stratum the harmless baseline was matched on; "" when it was not matched).
DIRECTION_PROMPTS = TableSpec("prompts.parquet", (
    "prompt_id", "prompt", "analysis_node", "harmful", "baseline_refused", "request_form"),
    optional=("prompt_id", "baseline_refused"))

TABLES: tuple[TableSpec, ...] = (SELECTION, STEERING_DOSE, ABLATION_STABILITY, CONE_ABLATION, CROSS_ABLATION,
                                 CROSS_ABLATION_SUMMARY, STEERING, CONDITIONS, CONDITIONS_SUMMARY, WORDING,
                                 LOGIT_LENS_TOKENS, LOGIT_LENS_SCORES)
# the verdicts' scans, which `run`'s causal stage writes and the `directions` sub-commands do not (restoration
# only with a reference model)
SCANS: tuple[TableSpec, ...] = (BANDS, COMPONENTS, RESTORATION)

REFUSAL_TOKENS = "refusal_tokens.json"  # RefusalTokens.to_dict()
SELECTION_JSON = "selection.json"  # the pooled Selection.to_dict() + steering_coefficient, validation sizes
POOLED_JSON = "pooled.json"  # the headline: pooled ablation and addition on evaluation prompts
SKIPPED = "skipped.json"  # {"reason"}: the model never refused, so nothing causal could be measured
SUITE_METRICS = "causal.json"  # `organism test`'s metrics (`run` keeps its stage's metrics in the stage record)
JSON_FILES = (REFUSAL_TOKENS, SELECTION_JSON, POOLED_JSON)
CROSS_ABLATION_FIGURE = "cross_ablation.png"
STEERING_FIGURE = "steering.png"


def write_table(df: pd.DataFrame, folder: str | Path, spec: TableSpec) -> Path:
    """Write `df` as `folder/spec.name` (Parquet, atomically) after checking its columns against `spec`."""
    spec.check(df)
    return atomic_write(Path(folder) / spec.name, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(obj: Any, folder: str | Path, name: str) -> Path:
    """`folder/name` as indented JSON with sorted keys (the format every stage record uses)."""
    return atomic_write_text(Path(folder) / name, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (the suffix of `path` picks the format)."""
    target = Path(path)
    return atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=dpi, format=target.suffix.lstrip(".")))
