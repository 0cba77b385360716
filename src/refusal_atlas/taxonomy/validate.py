"""Cross-node checks of a taxonomy: parents exist, no cycles, defaults resolvable, vocabulary.

Per-key checks happen while parsing (loader.py); what needs the whole taxonomy lives here so
it also applies to taxonomies built in memory (e.g. read back from RDF). Every problem is
located at the node's `source_file:source_line` when the node came from a file.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from refusal_atlas.io import brief
from refusal_atlas.taxonomy.conditions import ConditionVocabulary
from refusal_atlas.taxonomy.model import Node, Taxonomy
from refusal_atlas.taxonomy.yamlio import Problem

T = TypeVar("T", bound=Hashable)


def _at(node: Node, message: str) -> Problem:
    return Problem(node.source_file or "<taxonomy>", node.source_line or 1, message)


def validate_taxonomy(taxonomy: Taxonomy, vocab: ConditionVocabulary | None = None, *,
                      unparsed_ids: frozenset[str] = frozenset()) -> list[Problem]:
    """All structural problems (unknown parents, cycles, missing root defaults, vocabulary).

    `unparsed_ids` are ids of nodes that exist in the files but failed to parse (already
    reported): children naming them are not reported again as having an unknown parent.
    """
    problems: list[Problem] = []
    problems.extend(check_parents(taxonomy, unparsed_ids))
    problems.extend(check_cycles(taxonomy))
    problems.extend(check_root_defaults(taxonomy))
    if vocab is not None:
        problems.extend(check_vocabulary(taxonomy, vocab))
    return problems


def check_parents(taxonomy: Taxonomy, unparsed_ids: frozenset[str] = frozenset()) -> list[Problem]:
    """Every id in `broader` must be a node; no parent listed twice."""
    problems = []
    for node in taxonomy:
        seen: set[str] = set()
        for parent in node.broader:
            if parent in seen:
                problems.append(_at(node, f"node {brief(node.id)} lists parent {brief(parent)} twice in broader"))
            seen.add(parent)
            if parent == node.id or parent in unparsed_ids:
                continue  # reported as a cycle
            if parent not in taxonomy.nodes:
                close = difflib.get_close_matches(parent, list(taxonomy.nodes), n=1, cutoff=0.6)
                hint = f" (did you mean {brief(close[0])}?)" if close else ""
                problems.append(_at(node, f"node {brief(node.id)}: unknown parent {brief(parent)} in broader{hint}; "
                                          "every parent must be a node id defined in the taxonomy"))
    return problems


def parent_cycles(starts: Iterable[T], parents: Callable[[T], Sequence[T]], rank: Callable[[T], Any]
                  ) -> dict[tuple[str, ...], list[T]]:
    """Each distinct cycle along `parents` as [a, b, ..., a], rotated to start at its lowest-`rank` member, keyed by
    its members' str(); the search starts from each of `starts` in turn (iterative DFS, so deep chains cannot hit
    the recursion limit)."""
    state: dict[T, int] = {}  # 1 = on stack, 2 = done
    found: dict[tuple[str, ...], list[T]] = {}
    for start in starts:
        if start in state:
            continue
        stack = [start]
        work = [(start, 0)]
        state[start] = 1
        while work:
            node, i = work[-1]
            nxt = parents(node)
            if i >= len(nxt):
                work.pop()
                stack.pop()
                state[node] = 2
                continue
            work[-1] = (node, i + 1)
            parent = nxt[i]
            if state.get(parent) == 1:
                cycle = stack[stack.index(parent):]
                first = min(range(len(cycle)), key=lambda k: rank(cycle[k]))
                rotated = cycle[first:] + cycle[:first]
                found.setdefault(tuple(map(str, rotated)), [*rotated, rotated[0]])
            elif parent not in state:
                state[parent] = 1
                stack.append(parent)
                work.append((parent, 0))
    return found


def find_cycles(taxonomy: Taxonomy) -> list[list[str]]:
    """Each distinct cycle along `broader` as [a, b, ..., a] (rotated to start at its first node in load order)."""
    order = {nid: i for i, nid in enumerate(taxonomy.nodes)}
    found = parent_cycles(taxonomy.nodes, lambda nid: [p for p in taxonomy.nodes[nid].broader if p in taxonomy.nodes],
                          order.__getitem__)
    return sorted(found.values(), key=lambda c: order[c[0]])


def check_cycles(taxonomy: Taxonomy) -> list[Problem]:
    """A node may not be its own ancestor."""
    problems = []
    for cycle in find_cycles(taxonomy):
        node = taxonomy.nodes[cycle[0]]
        problems.append(_at(node, f"cycle in broader: {' -> '.join(cycle)}; a node cannot be its own ancestor"))
    return problems


def check_root_defaults(taxonomy: Taxonomy) -> list[Problem]:
    """A node without `expect` inherits it, so every root must set one."""
    return [
        _at(node, f"root node {brief(node.id)} has no `expect`: a node without parents must set the default "
                  "behaviour (refuse, redirect, comply_with_caveats, comply)")
        for node in taxonomy
        if node.expect is None and not node.broader
    ]


def check_vocabulary(taxonomy: Taxonomy, vocab: ConditionVocabulary) -> list[Problem]:
    """Every rule's `when` uses known dimensions and values."""
    problems = []
    for node in taxonomy:
        for rule in node.conditions:
            for dim, value in rule.when.items():
                msg = vocab.problem(dim, value)
                if msg:
                    problems.append(_at(node, f"node {brief(node.id)}: {msg}"))
    return problems
