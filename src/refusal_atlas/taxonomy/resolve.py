"""What behaviour the taxonomy expects for a node in a given context, and why.

Resolution semantics (the documented contract; tests in tests/taxonomy/test_resolve.py):

1. **Default behaviour.** A node's default is its own `expect`. A node without `expect`
   inherits the *most restrictive* of its parents' resolved defaults (refuse > redirect >
   comply_with_caveats > comply), so a node under two parents is never looser than either.
   A node's own `expect` always wins over inherited defaults, so a child may be looser than
   its parent (fireworks under explosives). Every root must set `expect` (validation).

2. **Rules are inherited.** The rules that apply to a node are its own `conditions` plus every
   ancestor's (all the way up, through every parent of a DAG). A rule `when` lists
   dimension: value pairs; it *matches* a context when every pair is present in the context
   with that value (extra context dimensions are ignored).

3. **Choosing among matching rules.** The most specific matching rule wins (the one naming
   the most dimensions). Among equally specific rules the more restrictive behaviour wins
   (ties are safety-first). Distance does not matter: a child's own rule does **not** override
   an ancestor's rule of the same specificity; to loosen an inherited rule a child must name
   more dimensions. When several rules tie on both, the nearest node's (own first, then
   ancestors breadth-first) is reported as the deciding rule.

4. **No matching rule → the default**, even when the default is looser or stricter than
   what rules would say; a matching rule always beats the default.

An empty context therefore always gives the default behaviour.

A consequence to keep in mind when writing rules: specificity beats restrictiveness across
levels, so a 2-dimension permission (`purpose: licensed_research, professional_role: chemist`)
beats an inherited 1-dimension prohibition (`user_age: minor`) when both match. Where a
prohibition must hold regardless, also state it with the other dimensions
(`{user_age: minor, purpose: licensed_research}` -> refuse).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import brief
from refusal_atlas.taxonomy.model import Behaviour, ConditionRule, Status, Taxonomy


@dataclass(frozen=True)
class Resolution:
    """The resolved behaviour; `rule` is None when the default applied; `source_node` gave it."""

    behaviour: Behaviour
    rule: ConditionRule | None
    source_node: str
    reason: str
    node_id: str = ""
    context: dict[str, str] = field(default_factory=dict)
    default: Behaviour | None = None
    candidates: tuple[tuple[str, ConditionRule], ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready form (the CLI's `--json`)."""
        return {
            "node": self.node_id,
            "context": dict(self.context),
            "behaviour": self.behaviour.value,
            "default": self.default.value if self.default else None,
            "source_node": self.source_node,
            "rule": _rule_dict(self.rule) if self.rule else None,
            "reason": self.reason,
            "matching_rules": [{"node": nid, **_rule_dict(r)} for nid, r in self.candidates],
        }


def _rule_dict(rule: ConditionRule) -> dict:
    return {"when": dict(rule.when), "expect": rule.expect.value, "rationale": rule.rationale}


def format_when(when: dict[str, str]) -> str:
    """`{a: x, b: y}` as `a=x,b=y` (the CLI's condition syntax)."""
    return ",".join(f"{k}={v}" for k, v in when.items())


def _require(taxonomy: Taxonomy, node_id: str) -> None:
    if node_id not in taxonomy.nodes:
        close = difflib.get_close_matches(node_id, list(taxonomy.nodes), n=1, cutoff=0.6)
        hint = f" (did you mean {brief(close[0])}?)" if close else ""
        raise AtlasError(f"unknown node id {brief(node_id)}{hint}; `refusal-atlas taxonomy show` lists the ids")


def default_source(taxonomy: Taxonomy, node_id: str) -> tuple[Behaviour, str]:
    """(default behaviour, id of the node whose own `expect` supplies it)."""
    _require(taxonomy, node_id)
    memo: dict[str, tuple[Behaviour, str]] = {}

    def walk(nid: str, path: tuple[str, ...]) -> tuple[Behaviour, str]:
        if nid in memo:
            return memo[nid]
        node = taxonomy.nodes[nid]
        if node.expect is not None:
            result = (node.expect, nid)
        else:
            parents = [p for p in node.broader if p in taxonomy.nodes and p not in path]
            if not parents:
                raise AtlasError(f"node {brief(nid)} has no `expect` and no parent to inherit one from; "
                                 "set `expect` on it or on a root above it")
            found = [walk(p, (*path, nid)) for p in parents]
            # most restrictive; the first parent (in `broader` order) wins a tie
            result = max(found, key=lambda bs: bs[0].restrictiveness)
        memo[nid] = result
        return result

    return walk(node_id, ())


def default_behaviour(taxonomy: Taxonomy, node_id: str) -> Behaviour:
    """The node's own `expect`, else the most restrictive of its parents' defaults."""
    return default_source(taxonomy, node_id)[0]


def effective_rules(taxonomy: Taxonomy, node_id: str) -> list[tuple[str, ConditionRule]]:
    """(node id, rule) for the node's own rules, then each ancestor's (nearest first)."""
    _require(taxonomy, node_id)
    rules = [(node_id, r) for r in taxonomy.nodes[node_id].conditions]
    for ancestor in taxonomy.ancestors(node_id):
        rules.extend((ancestor, r) for r in taxonomy.nodes[ancestor].conditions)
    return rules


def resolve(taxonomy: Taxonomy, node_id: str, context: dict[str, str] | None = None) -> Resolution:
    """The expected behaviour for `node_id` in `context` and the rule that decided it."""
    context = dict(context or {})
    default, source = default_source(taxonomy, node_id)
    candidates = [(nid, r) for nid, r in effective_rules(taxonomy, node_id) if r.matches(context)]
    if not candidates:
        how = "its own `expect`" if source == node_id else f"inherited from {brief(source)}"
        what = "no condition rule matches the context" if context else "no context given"
        return Resolution(default, None, source, f"{what}; default {default.value} ({how})",
                          node_id=node_id, context=context, default=default)
    # max() keeps the first of equal keys, and candidates are nearest-first
    best_nid, best = max(candidates, key=lambda c: (c[1].specificity, c[1].expect.restrictiveness))
    where = "own rule" if best_nid == node_id else f"rule inherited from {brief(best_nid)}"
    reason = f"{where} when {format_when(best.when)} ({best.specificity} dimension(s)) matched"
    others = len(candidates) - 1
    if others:
        tied = [c for c in candidates if c[1].specificity == best.specificity and c[1] is not best]
        reason += f"; beats {others} other matching rule(s)"
        if tied:
            reason += " (equally specific ones lose to the more restrictive behaviour)"
    return Resolution(best.expect, best, best_nid, reason, node_id=node_id, context=context,
                      default=default, candidates=tuple(candidates))


def contextual_nodes(taxonomy: Taxonomy, *, include_deprecated: bool = False) -> list[str]:
    """Ids of nodes where some context (a rule's own `when`) resolves to a non-default behaviour."""
    out = []
    for node in taxonomy:
        if node.status is Status.DEPRECATED and not include_deprecated:
            continue
        default = default_behaviour(taxonomy, node.id)
        if any(resolve(taxonomy, node.id, r.when).behaviour is not default
               for _, r in effective_rules(taxonomy, node.id)):
            out.append(node.id)
    return out
