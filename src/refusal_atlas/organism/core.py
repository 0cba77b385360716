"""The organism's public names in one place, for code written before the package was split by concern.

New code imports from the module of one concern (`settings`, `policy`, `rows`, `targets`, `training`,
`evaluation`, `build`, `separable`); this module only re-exports them so that callers outside the
package keep working unchanged.
"""

from __future__ import annotations

from refusal_atlas.organism.build import build_organism, cache_key, load_organism, save_model, write_parquet
from refusal_atlas.organism.evaluation import adherence_metrics, adherence_table, evaluate
from refusal_atlas.organism.policy import (
    behaviour_of,
    frame,
    load_framings,
    node_root,
    refusal_text,
    wording_groups,
)
from refusal_atlas.organism.rows import build_rows, prompt_pool, stratified_nodes
from refusal_atlas.organism.settings import (
    CATEGORIES,
    CAVEAT,
    MODEL_DIR,
    NODE_REFUSAL,
    ORGANISM_JSON,
    RECIPE_VERSION,
    REDIRECT,
    SHARED_REFUSAL,
    OrganismResult,
    OrganismSettings,
)
from refusal_atlas.organism.targets import drop_refusal_like_answers, make_targets
from refusal_atlas.organism.training import finetune

__all__ = [
    "CATEGORIES", "CAVEAT", "MODEL_DIR", "NODE_REFUSAL", "ORGANISM_JSON", "RECIPE_VERSION", "REDIRECT",
    "SHARED_REFUSAL", "OrganismResult", "OrganismSettings", "adherence_metrics", "adherence_table",
    "behaviour_of", "build_organism", "build_rows", "cache_key", "drop_refusal_like_answers", "evaluate",
    "finetune", "frame", "load_framings", "load_organism", "make_targets", "node_root", "prompt_pool",
    "refusal_text", "save_model", "stratified_nodes", "wording_groups", "write_parquet",
]
