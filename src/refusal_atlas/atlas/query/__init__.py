"""Questions a researcher asks the atlas, as functions returning plain JSON-ready dicts.

- `node_report(store, id)`: a node's directions per layer and position with their reliability,
  its nearest nodes by overlap, its clusters, its cross-ablation row and its conditions; a node
  the run did not analyse falls back to its nearest analysed ancestor and says so;
- `rank_direction(store, vector)`: which harm sources does an arbitrary direction (from this or
  another tool) correspond to? Cosine with every node's direction, beside that node's noise floor
  and a p-value against random directions;
- `source_report(store, "llamaguard3:S9")`: an external category -> our nodes -> their directions;
- `sparql(store, query)`: SELECT / ASK / CONSTRUCT over atlas.ttl;
- `feature_report(store, 123)`: one latent of the run's SAE, the nodes that selected it, its clamp.

The CLI (`refusal-atlas query ...`) renders these dicts as tables or prints them as JSON.

How to read a direction match: a node's *noise floor* is the mean split-half cosine of its own
direction (two halves of its prompts); its *ceiling* `sqrt(reliability)` is the cosine a perfect,
noise-free copy of the node's true direction would be expected to reach with the stored estimate.
`match = cosine / ceiling` therefore near 1 means "as close as the data allow" (above 1: within
the estimate's noise of a perfect match). The *p-value* is the share of seeded random unit
directions in d_model whose best cosine over the same searched layers, position and ranked nodes
reaches the observed one, so searching many layers and nodes is paid for (`p_node`: this node
alone); a row is `above_chance` when p < 0.05.
"""

from __future__ import annotations

from refusal_atlas.atlas.query.common import POOLED, analysed_fallback, selected_layer_position
from refusal_atlas.atlas.query.direction import (
    ALPHA,
    MATCH_LEGEND,
    NULL_DRAWS,
    VECTOR_SUFFIXES,
    chance_null,
    load_vector,
    rank_direction,
)
from refusal_atlas.atlas.query.feature import feature_report
from refusal_atlas.atlas.query.node import node_report
from refusal_atlas.atlas.query.source import source_report, sparql

__all__ = ["ALPHA", "MATCH_LEGEND", "NULL_DRAWS", "POOLED", "VECTOR_SUFFIXES", "analysed_fallback", "chance_null",
           "feature_report", "load_vector", "node_report", "rank_direction", "selected_layer_position",
           "source_report", "sparql"]
