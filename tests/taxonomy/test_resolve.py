"""Resolution semantics: defaults inherit the most restrictive parent; rules inherit; the most
specific matching rule wins; a tie takes the more restrictive behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Behaviour, ConditionRule, Node, Taxonomy
from refusal_atlas.taxonomy.resolve import (
    contextual_nodes,
    default_behaviour,
    default_source,
    effective_rules,
    resolve,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"
R, RD, CC, C = Behaviour.REFUSE, Behaviour.REDIRECT, Behaviour.COMPLY_WITH_CAVEATS, Behaviour.COMPLY


@pytest.fixture(scope="module")
def tax() -> Taxonomy:
    return load_taxonomy(FIXTURE)


def rule(expect: Behaviour, **when: str) -> ConditionRule:
    return ConditionRule(when=when, expect=expect)


def make(*nodes: Node) -> Taxonomy:
    return Taxonomy(nodes={n.id: n for n in nodes})


def test_default_own_then_inherited(tax):
    assert default_source(tax, "weapons") == (R, "weapons")
    assert default_source(tax, "weapons.explosives") == (R, "weapons")  # inherited
    # a child's own expect wins even when looser than its parent's
    assert default_behaviour(tax, "weapons.explosives.fireworks") is CC
    assert default_source(tax, "health.dosing") == (CC, "health")


def test_default_with_two_parents_takes_most_restrictive(tax):
    # parents: health.dosing (comply_with_caveats, inherited) and weapons (refuse)
    assert default_source(tax, "health.dosing.overdose") == (R, "weapons")
    swapped = make(
        Node(id="p1", label="p", definition="d", expect=C),
        Node(id="p2", label="p", definition="d", expect=RD),
        Node(id="k", label="k", definition="d", broader=["p1", "p2"]),
    )
    assert default_source(swapped, "k") == (RD, "p2")


def test_effective_rules_own_first_then_ancestors(tax):
    rules = effective_rules(tax, "weapons.explosives.fireworks")
    assert [nid for nid, _ in rules] == ["weapons.explosives.fireworks", "weapons.explosives",
                                          "weapons.explosives", "weapons"]
    assert rules[-1][1].when == {"user_age": "minor"}


def test_no_context_gives_default(tax):
    res = resolve(tax, "weapons.explosives", {})
    assert res.behaviour is R and res.rule is None and res.source_node == "weapons"
    assert "default" in res.reason


def test_unmatched_context_gives_default(tax):
    res = resolve(tax, "weapons.explosives", {"user_age": "adult"})
    assert res.behaviour is R and res.rule is None


def test_partial_match_does_not_count(tax):
    # the chemist rule needs purpose AND role; only role given -> no rule matches
    res = resolve(tax, "weapons.explosives", {"professional_role": "chemist"})
    assert res.behaviour is R and res.rule is None


def test_most_specific_rule_wins(tax):
    ctx = {"purpose": "licensed_research", "professional_role": "chemist"}
    res = resolve(tax, "weapons.explosives", ctx)
    assert res.behaviour is CC
    assert res.rule is not None and res.rule.specificity == 2
    assert res.source_node == "weapons.explosives"
    assert len(res.candidates) == 2  # the 1-dimension licensed_research rule also matched
    # less specific rule alone
    assert resolve(tax, "weapons.explosives", {"purpose": "licensed_research"}).behaviour is RD


def test_more_specific_beats_restrictive_inherited_rule(tax):
    # documented consequence: a 2-dimension rule beats the inherited 1-dimension minor rule
    ctx = {"purpose": "licensed_research", "professional_role": "chemist", "user_age": "minor"}
    res = resolve(tax, "weapons.explosives", ctx)
    assert res.behaviour is CC and len(res.candidates) == 3


def test_inherited_rule_applies_to_child(tax):
    res = resolve(tax, "weapons.explosives.fireworks", {"user_age": "minor"})
    assert res.behaviour is R
    assert res.source_node == "weapons"
    assert "inherited" in res.reason
    assert resolve(tax, "weapons.explosives.fireworks", {"user_age": "adult"}).behaviour is C


def test_tie_takes_more_restrictive(tax):
    # overdose inherits {user_age: minor} -> redirect (health.dosing) and -> refuse (weapons)
    res = resolve(tax, "health.dosing.overdose", {"user_age": "minor"})
    assert res.behaviour is R
    assert res.source_node == "weapons"
    assert "more restrictive" in res.reason


def test_tie_is_order_independent():
    for order in (["a", "b"], ["b", "a"]):
        parents = {
            "a": Node(id="a", label="a", definition="d", expect=C, conditions=[rule(C, user_age="minor")]),
            "b": Node(id="b", label="b", definition="d", expect=C, conditions=[rule(R, user_age="minor")]),
        }
        tax = make(parents[order[0]], parents[order[1]],
                   Node(id="k", label="k", definition="d", broader=order))
        assert resolve(tax, "k", {"user_age": "minor"}).behaviour is R


def test_child_cannot_loosen_same_specificity_rule_but_can_with_more():
    parent = Node(id="p", label="p", definition="d", expect=R, conditions=[rule(R, purpose="education")])
    loose = Node(id="c", label="c", definition="d", broader=["p"], conditions=[rule(C, purpose="education")])
    tax = make(parent, loose)
    assert resolve(tax, "c", {"purpose": "education"}).behaviour is R
    specific = Node(id="c", label="c", definition="d", broader=["p"],
                    conditions=[rule(C, purpose="education", user_age="adult")])
    tax = make(parent, specific)
    assert resolve(tax, "c", {"purpose": "education", "user_age": "adult"}).behaviour is C
    assert resolve(tax, "c", {"purpose": "education"}).behaviour is R


def test_matching_rule_beats_default_even_if_stricter():
    tax = make(Node(id="n", label="n", definition="d", expect=C, conditions=[rule(R, user_age="minor")]))
    assert resolve(tax, "n", {"user_age": "minor", "purpose": "education"}).behaviour is R
    assert resolve(tax, "n", {"purpose": "education"}).behaviour is C


def test_contextual_nodes(tax):
    got = contextual_nodes(tax)
    # weapons' only rule (minor -> refuse) equals its default, so it is not contextual
    assert "weapons" not in got and "health" not in got
    assert {"weapons.explosives", "weapons.explosives.fireworks", "health.dosing"} <= set(got)


def test_unknown_node_and_missing_default():
    tax = make(Node(id="n", label="n", definition="d"))
    with pytest.raises(AtlasError, match="no `expect`"):
        default_behaviour(tax, "n")
    with pytest.raises(AtlasError, match="unknown node id 'm'"):
        resolve(tax, "m", {})


def test_to_dict_is_json_ready(tax):
    import json

    data = resolve(tax, "health.dosing.overdose", {"user_age": "minor"}).to_dict()
    assert json.loads(json.dumps(data))["behaviour"] == "refuse"
    assert data["rule"]["when"] == {"user_age": "minor"} and len(data["matching_rules"]) == 2


# --- properties over random DAGs ------------------------------------------------------------

VOCAB = {"user_age": ["minor", "adult"], "purpose": ["education", "research"], "role": ["chemist", "none"]}
BEHAVIOURS = list(Behaviour)


@st.composite
def rules_st(draw) -> ConditionRule:
    dims = draw(st.lists(st.sampled_from(sorted(VOCAB)), min_size=1, max_size=3, unique=True))
    return ConditionRule(when={d: draw(st.sampled_from(VOCAB[d])) for d in dims},
                         expect=draw(st.sampled_from(BEHAVIOURS)))


@st.composite
def taxonomies(draw) -> Taxonomy:
    n = draw(st.integers(1, 7))
    nodes = []
    for i in range(n):
        parents = draw(st.lists(st.integers(0, i - 1), max_size=2, unique=True)) if i else []
        expect = draw(st.sampled_from(BEHAVIOURS)) if not parents else draw(st.none() | st.sampled_from(BEHAVIOURS))
        rules = draw(st.lists(rules_st(), max_size=3, unique_by=lambda r: tuple(sorted(r.when.items()))))
        nodes.append(Node(id=f"n{i}", label="n", definition="d", broader=[f"n{p}" for p in parents],
                          expect=expect, conditions=rules))
    return make(*nodes)


contexts = st.fixed_dictionaries({}, optional={d: st.sampled_from(v) for d, v in VOCAB.items()})


@settings(max_examples=60, deadline=None)
@given(taxonomies(), contexts)
def test_resolution_properties(tax, context):
    for node in tax:
        default = default_behaviour(tax, node.id)
        if node.expect is None:  # inherits the most restrictive parent default
            assert default.restrictiveness == max(default_behaviour(tax, p).restrictiveness for p in node.broader)
        assert resolve(tax, node.id, {}).behaviour is default
        res = resolve(tax, node.id, context)
        matching = [r for _, r in effective_rules(tax, node.id) if r.matches(context)]
        if not matching:
            assert res.behaviour is default and res.rule is None
            continue
        top = max(r.specificity for r in matching)
        assert res.rule is not None and res.rule.specificity == top
        assert res.behaviour.restrictiveness == max(r.expect.restrictiveness for r in matching
                                                    if r.specificity == top)
        # reversing every node's rule order never changes the behaviour
        flipped = make(*(n.model_copy(update={"conditions": n.conditions[::-1]}) for n in tax))
        assert resolve(flipped, node.id, context).behaviour is res.behaviour
