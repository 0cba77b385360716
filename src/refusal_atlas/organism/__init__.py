"""Known-answer model organisms: a base chat model fine-tuned so the truth about its refusal is known.

Modules (one concern each): `settings` (settings, result, wording constants, recipe version),
`policy` (wording groups, framings, behaviour per context), `controls` (length-matched control
framings), `rows` (prompt pool, train / held-out rows), `targets` (refusal wording or the base's
own answers), `training` (the fine-tune; frozen blocks or one trained band), `evaluation`
(held-out adherence), `build` (cache key and the shared recipe), `separable` (two branches planted
in disjoint bands of blocks, verified by restoring each band). `core` re-exports the older names.
"""

from refusal_atlas.organism.build import build_organism, load_organism
from refusal_atlas.organism.controls import control_rows, load_control_framings
from refusal_atlas.organism.separable import SeparableSettings, build_separable
from refusal_atlas.organism.settings import OrganismResult, OrganismSettings

__all__ = [
    "OrganismResult",
    "OrganismSettings",
    "SeparableSettings",
    "build_organism",
    "build_separable",
    "control_rows",
    "load_control_framings",
    "load_organism",
]
