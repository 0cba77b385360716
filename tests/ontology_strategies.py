"""Hypothesis strategies for random taxonomies (shared by the ontology tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from refusal_atlas.taxonomy.conditions import ConditionValue, ConditionVocabulary, Dimension
from refusal_atlas.taxonomy.model import Behaviour, ConditionRule, Node, Scheme, Status, Taxonomy

TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co"), blacklist_characters="\ufeff")
    | st.sampled_from(" \n\t'\":#-&*!|>%@`{}[],?"),
    min_size=1,
    max_size=30,
).filter(lambda s: s.strip() != "")
ID_PART = st.from_regex(r"[a-z0-9_][a-z0-9_-]{0,6}", fullmatch=True)
# A small vocabulary keeps each example fast. It covers the three ways a context is written:
# a DPV term standing for one value (used directly), a DPV term shared by two values (ambiguous,
# so our minted term is used), and values with no DPV term.
SMALL_VOCAB = ConditionVocabulary(dimensions={
    "user_age": Dimension(label="User age", definition="Age group.", values={
        "minor": ConditionValue(label="Minor", definition="Under 18.", dpv="https://w3id.org/dpv#Child"),
        "adult": ConditionValue(label="Adult", definition="18 or over.", dpv="https://w3id.org/dpv#Adult"),
    }),
    "purpose": Dimension(label="Purpose", definition="Stated purpose.", values={
        "licensed_research": ConditionValue(label="Licensed research", definition="In a licensed lab.",
                                            dpv="https://w3id.org/dpv#ScientificResearch"),
        "school_project": ConditionValue(label="School project", definition="Homework.",
                                         dpv="https://w3id.org/dpv#ScientificResearch"),
        "fiction": ConditionValue(label="Fiction", definition="Writing a story."),
    }),
    "professional_role": Dimension(label="Role", definition="Stated profession.", values={
        "chemist": ConditionValue(label="Chemist", definition="A chemist."),
        "nurse": ConditionValue(label="Nurse", definition="A nurse."),
    }),
})
DIMENSIONS = {dim: list(d.values) for dim, d in SMALL_VOCAB.dimensions.items()}


@st.composite
def rules(draw: st.DrawFn) -> list[ConditionRule]:
    out: list[ConditionRule] = []
    seen: set[tuple] = set()
    for _ in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(st.sampled_from(sorted(DIMENSIONS)), min_size=1, max_size=3, unique=True))
        when = {dim: draw(st.sampled_from(DIMENSIONS[dim])) for dim in dims}
        key = tuple(sorted(when.items()))
        if key in seen:  # the YAML forbids two rules with the same `when` in one node
            continue
        seen.add(key)
        out.append(ConditionRule(when=when, expect=draw(st.sampled_from(list(Behaviour))),
                                 rationale=draw(st.none() | TEXT)))
    return out


@st.composite
def taxonomies(draw: st.DrawFn) -> Taxonomy:
    n = draw(st.integers(1, 7))
    ids: list[str] = []
    while len(ids) < n:
        parent_prefix = draw(st.sampled_from(ids)) + "." if ids and draw(st.booleans()) else ""
        candidate = parent_prefix + draw(ID_PART)
        if candidate not in ids and ".." not in candidate:
            ids.append(candidate)
    nodes: dict[str, Node] = {}
    for i, node_id in enumerate(ids):
        parents = draw(st.lists(st.sampled_from(ids[:i]), max_size=3, unique=True)) if i else []
        expect = draw(st.sampled_from(list(Behaviour)))
        if parents and draw(st.booleans()):
            expect = None  # inherit; roots must state one
        examples = draw(st.lists(TEXT, max_size=3))
        if examples and draw(st.booleans()):
            examples.append(examples[0])  # duplicates survive too
        nodes[node_id] = Node(
            id=node_id, label=draw(TEXT), definition=draw(TEXT), broader=parents,
            kind=draw(st.none() | st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True)),
            expect=expect, conditions=draw(rules()), examples=examples,
            status=draw(st.sampled_from(list(Status))), provenance=draw(st.none() | TEXT),
        )
    order = draw(st.permutations(ids))  # file order need not be topological
    namespace = draw(st.sampled_from(["https://w3id.org/refusal-atlas/taxonomy/", "https://example.org/t#",
                                      "urn:x-test:tax:", "https://example.org/other/"]))
    scheme = Scheme(
        id=draw(ID_PART), title=draw(TEXT), version=draw(st.sampled_from(["0.1.0", "1", "2026-01"])),
        namespace=namespace,
        license=draw(st.none() | st.sampled_from(["CC-BY-4.0", "https://spdx.org/licenses/MIT"]) | TEXT),
        description=draw(st.none() | TEXT),
    )
    return Taxonomy(scheme=scheme, nodes={nid: nodes[nid] for nid in order})
