"""Template text a curator has not yet replaced, and the checks `accept` runs before accepting a node.

A proposed node (from `curate map` or written by hand) may hold template text: the proposal's
definition starts with `PROPOSAL_DEFINITION_PREFIX`, and people write "TODO", "..." or "<fill in>"
while drafting. Accepting such a node would put a definition that names no source of harm into
the taxonomy, its RDF export and every later run, so `accept` refuses it, naming the file and line
of the field to rewrite.

The markers are deliberately narrow: prose fields (label, definition, kind, rule rationales) are
checked for template phrases and for values that are only punctuation; examples are real user
requests, which may well mention a "TODO list", so only whole-value placeholders count there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import brief
from refusal_atlas.taxonomy.model import Node, Status, Taxonomy
from refusal_atlas.taxonomy.yamlio import item_line, load_for_edit, value_line

# What `curate map` writes as a proposed node's definition starts with this phrase.
PROPOSAL_DEFINITION_PREFIX = "Rewrite this definition"

# Phrases that only occur in template text (case-insensitive, anywhere in a prose field).
_TEMPLATE_PHRASES = re.compile(
    r"rewrite this|replace this|fill (?:this )?in|lorem ipsum|\bTODO\b|\bFIXME\b|\bTBD\b|\bXXX\b"
    r"|<\s*(?:label|definition|description|describe|placeholder|fill|todo|example|rationale)[^<>]{0,40}>",
    re.IGNORECASE)
# A whole value that says nothing: punctuation or ellipses only, or a lone placeholder word.
_EMPTY_VALUE = re.compile(r"[\s.\u2026?!_*#\-]*|(?:todo|tbd|fixme|xxx|placeholder|example|n/?a|none|null)"
                          r"|cluster[ _]?-?\d+", re.IGNORECASE)  # the last: a proposal's label when it had no words


@dataclass(frozen=True)
class Placeholder:
    """One unedited field: its YAML path (`definition`, `examples[2]`, `conditions[0].rationale`) and value."""

    field: str
    value: str
    line: int | None = None


def is_placeholder(value: str, *, prose: bool = True) -> bool:
    """Whether `value` is template text (see the module docstring for `prose`)."""
    text = value.strip()
    if _EMPTY_VALUE.fullmatch(text):
        return True
    return prose and bool(_TEMPLATE_PHRASES.search(text))


def node_placeholders(node: Node) -> list[Placeholder]:
    """Every field of `node` that still holds template text, in file order."""
    found: list[Placeholder] = []
    for field, value in (("label", node.label), ("definition", node.definition), ("kind", node.kind)):
        if value is not None and is_placeholder(value):
            found.append(Placeholder(field, value))
    for i, rule in enumerate(node.conditions):
        if rule.rationale is not None and is_placeholder(rule.rationale):
            found.append(Placeholder(f"conditions[{i}].rationale", rule.rationale))
    for i, example in enumerate(node.examples):
        if is_placeholder(example, prose=False) or example.strip().startswith(PROPOSAL_DEFINITION_PREFIX):
            found.append(Placeholder(f"examples[{i}]", example))
    return found


def _field_line(item: Any, field: str, default: int) -> int:
    """1-based line of `field` (`key`, `key[i]` or `key[i].sub`) inside the node's YAML mapping."""
    match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?(?:\.(\w+))?", field)
    if match is None or not isinstance(item, CommentedMap):
        return default
    key, index, sub = match.group(1), match.group(2), match.group(3)
    if index is None:
        return value_line(item, key, default)
    seq = item.get(key)
    if not isinstance(seq, list) or int(index) >= len(seq):
        return value_line(item, key, default)
    if sub is not None and isinstance(seq[int(index)], CommentedMap):
        return value_line(seq[int(index)], sub, item_line(seq, int(index), default))
    return item_line(seq, int(index), default)


def locate(node: Node, placeholders: list[Placeholder]) -> list[Placeholder]:
    """The placeholders with the line they sit on in the node's file (the node's line if not found)."""
    default = node.source_line or 1
    if not node.source_file:
        return [Placeholder(p.field, p.value, default) for p in placeholders]
    try:
        data, _ = load_for_edit(Path(node.source_file))
    except (AtlasError, OSError):
        return [Placeholder(p.field, p.value, default) for p in placeholders]
    nodes = data.get("nodes") if isinstance(data, CommentedMap) else None
    item = next((i for i in nodes or [] if isinstance(i, CommentedMap) and i.get("id") == node.id), None)
    return [Placeholder(p.field, p.value, _field_line(item, p.field, default)) for p in placeholders]


def acceptance_problem(taxonomy: Taxonomy, node: Node, *, allow_root: bool = False) -> str | None:
    """Why `node` may not be accepted yet (one line naming file:line and what to do), or None.

    Refused: template text in any field; a proposed node with no parent unless `allow_root`; a parent
    that is still proposed or is deprecated (a node is accepted under an accepted branch).
    """
    where = f"{node.source_file or '<taxonomy>'}:{node.source_line or 1}"
    found = locate(node, node_placeholders(node))
    if found:
        first = found[0]
        others = f" (and {len(found) - 1} more field(s): {', '.join(p.field for p in found[1:])})" if found[1:] else ""
        return (f"{node.source_file or '<taxonomy>'}:{first.line}: node {brief(node.id)}: {first.field} is still "
                f"template text ({brief(first.value, 60)}){others}; rewrite it (a definition names the source of "
                f"harm), then run `refusal-atlas taxonomy accept {node.id}` again")
    if node.status is Status.PROPOSED and not node.broader and not allow_root:
        return (f"{where}: node {brief(node.id)} has no parent; give it one with `refusal-atlas taxonomy move "
                f"{node.id} --parent PARENT -t DIR` (a proposal's comment names the suggested parent), or accept "
                "it as a new top-level branch with --root")
    for parent in node.broader:
        other = taxonomy.nodes.get(parent)
        if other is None:
            return (f"{where}: node {brief(node.id)}: parent {brief(parent)} does not exist; "
                    f"`refusal-atlas taxonomy move {node.id} --parent PARENT` names an existing one")
        if other.status is Status.PROPOSED:
            return (f"{where}: node {brief(node.id)}: parent {brief(parent)} is still proposed; accept it first "
                    f"(`refusal-atlas taxonomy accept {parent}`) or move {node.id} under an accepted node")
        if other.status is Status.DEPRECATED:
            return (f"{where}: node {brief(node.id)}: parent {brief(parent)} is deprecated; move {node.id} under "
                    "an active node first (`refusal-atlas taxonomy move`)")
    return None
