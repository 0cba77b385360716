"""The conditional harm-source taxonomy: model, loading, validation, resolution, crosswalks, editing.

Modules (one concern each): `model` (pydantic nodes), `yamlio` (located YAML reading, atomic
writes), `loader` (files -> Taxonomy with `path:line: message` errors), `validate` (cross-node
checks), `conditions` (the condition vocabulary), `resolve` (expected behaviour in a context),
`crosswalk` (SSSOM TSV), `edit` (comment-preserving edits), `diff` (field-level comparison).
"""

from refusal_atlas.taxonomy.conditions import ConditionVocabulary, load_conditions, parse_condition
from refusal_atlas.taxonomy.loader import load_taxonomy, taxonomy_hash
from refusal_atlas.taxonomy.model import Behaviour, ConditionRule, Node, Scheme, Status, Taxonomy
from refusal_atlas.taxonomy.resolve import Resolution, default_behaviour, effective_rules, resolve

__all__ = [
    "Behaviour",
    "ConditionRule",
    "ConditionVocabulary",
    "Node",
    "Resolution",
    "Scheme",
    "Status",
    "Taxonomy",
    "default_behaviour",
    "effective_rules",
    "load_conditions",
    "load_taxonomy",
    "parse_condition",
    "resolve",
    "taxonomy_hash",
]
