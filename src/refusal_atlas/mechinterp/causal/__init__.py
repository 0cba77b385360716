"""The causal protocol: selection, pooled ablation/addition, cross-ablation, steering, band and restoration
scans, wording vs detection, conditions — each a step of `protocol` that writes the files `files` declares."""

from refusal_atlas.mechinterp.causal.bands import band_scan
from refusal_atlas.mechinterp.causal.common import bootstrap_ci, discover_tokens, first_token_scores
from refusal_atlas.mechinterp.causal.conditions import condition_summary, condition_table
from refusal_atlas.mechinterp.causal.cross import cross_ablation, cross_ablation_summary, cross_summary
from refusal_atlas.mechinterp.causal.inputs import DirectionPrompts, direction_node_of, eval_sets_from_table
from refusal_atlas.mechinterp.causal.pooled import ablation_stability, cone_ablation, pooled_ablation_and_steering
from refusal_atlas.mechinterp.causal.protocol import CausalSession, Chosen, Discovered
from refusal_atlas.mechinterp.causal.restoration import restoration_scan
from refusal_atlas.mechinterp.causal.selection import (
    Selection,
    candidate_layers,
    choose_coefficient,
    default_ablation_starts,
    select_direction,
)
from refusal_atlas.mechinterp.causal.steering import steering
from refusal_atlas.mechinterp.causal.suite import OrganismTables, causal_suite
from refusal_atlas.mechinterp.causal.wording import wording_vs_detection

__all__ = [
    "CausalSession",
    "Chosen",
    "DirectionPrompts",
    "Discovered",
    "OrganismTables",
    "Selection",
    "ablation_stability",
    "band_scan",
    "bootstrap_ci",
    "candidate_layers",
    "causal_suite",
    "choose_coefficient",
    "condition_summary",
    "condition_table",
    "cone_ablation",
    "cross_ablation",
    "cross_ablation_summary",
    "cross_summary",
    "default_ablation_starts",
    "direction_node_of",
    "discover_tokens",
    "eval_sets_from_table",
    "first_token_scores",
    "pooled_ablation_and_steering",
    "restoration_scan",
    "select_direction",
    "steering",
    "wording_vs_detection",
]
