"""One rule for a node's branch, shared by the organism and `run`."""

from __future__ import annotations

from refusal_atlas.organism.core import node_root
from refusal_atlas.taxonomy.loader import load_taxonomy


def test_shipped_multi_parent_nodes_follow_their_first_listed_parent() -> None:
    tax = load_taxonomy()
    multi = [n for n in tax if len(n.broader) > 1]
    assert multi, "the shipped taxonomy has nodes with several parents"
    for node in multi:
        first_parent_branch = tax.branch_of(node.broader[0])
        assert tax.branch_of(node.id) == first_parent_branch
        assert node_root(tax, node.id) == first_parent_branch
    assert tax.branch_of("weapons.firearms.illegal_acquisition") == "weapons"


def test_every_node_has_a_root_as_branch_and_roots_are_their_own() -> None:
    tax = load_taxonomy()
    root_ids = {n.id for n in tax.roots()}
    for node in tax:
        assert tax.branch_of(node.id) in root_ids
    for rid in root_ids:
        assert tax.branch_of(rid) == rid
