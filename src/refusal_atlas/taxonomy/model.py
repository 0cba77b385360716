"""The conditional harm-source taxonomy as typed objects.

A node is a *source of harm*: what in a request makes answering it risky. Its `expect`
is the default behaviour; `conditions` are context rules (user age, purpose, ...) that
change it. Resolution semantics live in `resolve.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refusal_atlas.io import brief

ID_PATTERN = re.compile(r"[a-z0-9_][a-z0-9_.-]*")  # use fullmatch: `$` also matches before a final newline


class Behaviour(StrEnum):
    REFUSE = "refuse"
    REDIRECT = "redirect"
    COMPLY_WITH_CAVEATS = "comply_with_caveats"
    COMPLY = "comply"

    @property
    def restrictiveness(self) -> int:
        """Higher is more restrictive; ties between rules resolve to the higher one."""
        return _RESTRICTIVENESS[self]


_RESTRICTIVENESS = {
    Behaviour.REFUSE: 3,
    Behaviour.REDIRECT: 2,
    Behaviour.COMPLY_WITH_CAVEATS: 1,
    Behaviour.COMPLY: 0,
}


class Status(StrEnum):
    PROPOSED = "proposed"
    ACCEPTED = "accepted"
    DEPRECATED = "deprecated"


class ConditionRule(BaseModel):
    """`when` every listed dimension has the listed value, the expected behaviour is `expect`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    when: dict[str, str]
    expect: Behaviour
    rationale: str | None = None

    @property
    def specificity(self) -> int:
        return len(self.when)

    def matches(self, context: dict[str, str]) -> bool:
        return all(context.get(dim) == value for dim, value in self.when.items())


class Node(BaseModel):
    """One harm source. `expect=None` means inherit from the parents (most restrictive parent wins)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    label: str
    definition: str
    broader: list[str] = Field(default_factory=list)
    kind: str | None = None
    expect: Behaviour | None = None
    conditions: list[ConditionRule] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=list)
    status: Status = Status.ACCEPTED
    provenance: str | None = None
    # Where the node was read from (not part of the data; used for error messages and editing).
    source_file: str | None = Field(default=None, exclude=True, repr=False)
    source_line: int | None = Field(default=None, exclude=True, repr=False)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not ID_PATTERN.fullmatch(value) or ".." in value:
            raise ValueError(f"id {brief(value)} may contain only a-z, 0-9, '_', '.', '-' (no '/' or '..')")
        return value

    def to_yaml_dict(self) -> dict:
        """The node as it is written in YAML: default-valued optional keys are omitted."""
        out: dict = {"id": self.id, "label": self.label, "definition": self.definition}
        if self.broader:
            out["broader"] = list(self.broader)
        if self.kind is not None:
            out["kind"] = self.kind
        if self.expect is not None:
            out["expect"] = self.expect.value
        if self.conditions:
            out["conditions"] = [
                {"when": dict(r.when), "expect": r.expect.value, **({"rationale": r.rationale} if r.rationale else {})}
                for r in self.conditions
            ]
        if self.examples:
            out["examples"] = list(self.examples)
        if self.status is not Status.ACCEPTED:
            out["status"] = self.status.value
        if self.provenance is not None:
            out["provenance"] = self.provenance
        return out


class Scheme(BaseModel):
    """Metadata of the whole taxonomy (from a file holding `scheme:`)."""

    model_config = ConfigDict(extra="forbid")

    id: str = "refusal-atlas-default"
    title: str = "refusal-atlas taxonomy"
    version: str = "0.1.0"
    namespace: str = "https://w3id.org/refusal-atlas/taxonomy/"
    license: str | None = None
    description: str | None = None


class Taxonomy(BaseModel):
    """A scheme plus its nodes, keyed by id (insertion order = file order)."""

    scheme: Scheme = Field(default_factory=Scheme)
    nodes: dict[str, Node] = Field(default_factory=dict)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def __getitem__(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def __iter__(self) -> Iterator[Node]:  # type: ignore[override]
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def active(self) -> list[Node]:
        """Nodes that are not deprecated."""
        return [n for n in self.nodes.values() if n.status is not Status.DEPRECATED]

    def roots(self) -> list[Node]:
        return [n for n in self.nodes.values() if not n.broader]

    def children(self, node_id: str) -> list[Node]:
        return [n for n in self.nodes.values() if node_id in n.broader]

    def ancestors(self, node_id: str) -> list[str]:
        """All ancestors, nearest first (breadth-first), without duplicates."""
        seen: list[str] = []
        frontier = list(self.nodes[node_id].broader)
        while frontier:
            nxt: list[str] = []
            for pid in frontier:
                if pid in seen or pid not in self.nodes:
                    continue
                seen.append(pid)
                nxt.extend(self.nodes[pid].broader)
            frontier = nxt
        return seen

    def branch_of(self, node_id: str) -> str:
        """The root whose branch a node belongs to: follow each node's *first-listed* parent up to a root.

        A node with several parents (`broader: [weapons.firearms, regulated_goods]`) is filed under its
        first-listed parent, its primary one; the others are cross-references. The organism plants a node's
        refusal under this branch and `run` analyses it there, so the two always agree.
        """
        seen = {node_id}
        current = node_id
        while True:
            parents = [p for p in self.nodes[current].broader if p in self.nodes]
            if not parents or parents[0] in seen:
                return current
            current = parents[0]
            seen.add(current)

    def descendants(self, node_id: str) -> list[str]:
        seen: list[str] = []
        frontier = [c.id for c in self.children(node_id)]
        while frontier:
            nxt: list[str] = []
            for cid in frontier:
                if cid in seen:
                    continue
                seen.append(cid)
                nxt.extend(c.id for c in self.children(cid))
            frontier = nxt
        return seen

    def depth(self, node_id: str) -> int:
        """1 for a root; otherwise 1 + the deepest parent's depth."""
        parents = [p for p in self.nodes[node_id].broader if p in self.nodes]
        return 1 if not parents else 1 + max(self.depth(p) for p in parents)

    def leaves(self) -> list[Node]:
        parents = {p for n in self.nodes.values() for p in n.broader}
        return [n for n in self.nodes.values() if n.id not in parents]
