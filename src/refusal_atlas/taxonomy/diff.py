"""Compare two taxonomies node by node, field by field (review aid for proposals and releases).

Nodes are matched by id. For a changed node every differing field is listed; condition rules
are matched by their `when` (a rule is added, removed, or changes its behaviour/rationale),
so reordering rules is not a change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from refusal_atlas.taxonomy.model import Node, Taxonomy
from refusal_atlas.taxonomy.resolve import format_when

FIELDS = ("label", "definition", "broader", "kind", "expect", "examples", "status", "provenance")


@dataclass(frozen=True)
class FieldChange:
    """One field of one node: `old` -> `new` (None when absent)."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class NodeChange:
    id: str
    changes: tuple[FieldChange, ...]


@dataclass(frozen=True)
class TaxonomyDiff:
    added: tuple[Node, ...] = ()
    removed: tuple[Node, ...] = ()
    changed: tuple[NodeChange, ...] = ()
    scheme: tuple[FieldChange, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.scheme)

    def lines(self) -> list[str]:
        """Human-readable: `+ id`, `- id`, `~ id: field: old -> new`."""
        out = [f"~ scheme {c}" for c in self.scheme]
        out += [f"+ {n.id}  ({n.label}; {n.status.value})" for n in self.added]
        out += [f"- {n.id}  ({n.label})" for n in self.removed]
        for change in self.changed:
            out += [f"~ {change.id}: {c}" for c in change.changes]
        return out

    def to_dict(self) -> dict:
        return {
            "added": [n.to_yaml_dict() for n in self.added],
            "removed": [n.id for n in self.removed],
            "changed": {c.id: [{"field": f.field, "old": f.old, "new": f.new} for f in c.changes]
                        for c in self.changed},
            "scheme": [{"field": f.field, "old": f.old, "new": f.new} for f in self.scheme],
        }


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _plain(node: Node) -> dict[str, Any]:
    data = node.model_dump(mode="json", exclude={"conditions"})
    return {k: data.get(k) for k in FIELDS}


def node_changes(a: Node, b: Node) -> list[FieldChange]:
    """Field-level differences between two versions of a node."""
    pa, pb = _plain(a), _plain(b)
    changes = [FieldChange(f, pa[f], pb[f]) for f in FIELDS if pa[f] != pb[f]]
    rules_a = {format_when(dict(sorted(r.when.items()))): r for r in a.conditions}
    rules_b = {format_when(dict(sorted(r.when.items()))): r for r in b.conditions}
    for when in rules_a.keys() | rules_b.keys():
        ra, rb = rules_a.get(when), rules_b.get(when)
        name = f"conditions[{when}]"
        if ra is None and rb is not None:
            changes.append(FieldChange(name, None, rb.expect.value))
        elif rb is None and ra is not None:
            changes.append(FieldChange(name, ra.expect.value, None))
        elif ra is not None and rb is not None:
            if ra.expect != rb.expect:
                changes.append(FieldChange(name, ra.expect.value, rb.expect.value))
            if ra.rationale != rb.rationale:
                changes.append(FieldChange(f"{name}.rationale", ra.rationale, rb.rationale))
    rank = {f: i for i, f in enumerate(FIELDS)}
    return sorted(changes, key=lambda c: (rank.get(c.field, len(rank)), c.field))


def diff_taxonomies(a: Taxonomy, b: Taxonomy) -> TaxonomyDiff:
    """What changed from `a` to `b`: added, removed and changed nodes, plus scheme fields."""
    added = tuple(n for nid, n in b.nodes.items() if nid not in a.nodes)
    removed = tuple(n for nid, n in a.nodes.items() if nid not in b.nodes)
    changed = []
    for nid, node in a.nodes.items():
        if nid in b.nodes:
            fields = node_changes(node, b.nodes[nid])
            if fields:
                changed.append(NodeChange(nid, tuple(fields)))
    sa, sb = a.scheme.model_dump(), b.scheme.model_dump()
    scheme = tuple(FieldChange(k, sa[k], sb[k]) for k in sa if sa[k] != sb.get(k))
    return TaxonomyDiff(added, removed, tuple(changed), scheme)
