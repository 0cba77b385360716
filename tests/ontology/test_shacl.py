"""The default export conforms to shapes.ttl; every shape catches a graph that violates it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from rdflib import OWL, RDF, SKOS, BNode, Graph, Literal, URIRef
from rdflib.namespace import DCTERMS, SH, VANN

from refusal_atlas.ontology.directions import add_direction
from refusal_atlas.ontology.export import build_graph
from refusal_atlas.ontology.namespaces import DPV, RA
from refusal_atlas.ontology.results import add_finding, add_overlap_edge, add_pooled_direction, add_selection_candidate
from refusal_atlas.ontology.shacl import broader_cycles, shapes_graph, validate_graph
from refusal_atlas.ontology.to_rdf import taxonomy_to_graph
from refusal_atlas.taxonomy.conditions import load_conditions
from refusal_atlas.taxonomy.model import Behaviour, ConditionRule, Node, Taxonomy

NS = "https://w3id.org/refusal-atlas/taxonomy/"
INTEGER = URIRef("http://www.w3.org/2001/XMLSchema#integer")  # not rdflib.XSD: pytest probes module globals
ROOT, CHILD = URIRef(NS + "weapons"), URIRef(NS + "weapons.explosives")
RULE = URIRef(NS + "weapons.explosives/rule/1")
SCHEME = URIRef(NS.rstrip("/"))
MINOR = URIRef("https://w3id.org/refusal-atlas/condition/user_age/minor")
USER_AGE = URIRef("https://w3id.org/refusal-atlas/condition/user_age")
EXTERNAL = URIRef("https://w3id.org/refusal-atlas/external/harmbench/chemical_biological")
POOLED_DIR, CANDIDATE = URIRef("urn:test:pooled/3"), URIRef("urn:test:selection/0")
EDGE, FINDING = URIRef("urn:test:overlap/0"), URIRef("urn:test:finding/0")
DOUBLE = URIRef("http://www.w3.org/2001/XMLSchema#double")


def base_graph() -> Graph:
    """Two nodes, one rule, one context value, one mapping, one direction: small, so SHACL is quick."""
    tax = Taxonomy(nodes={
        "weapons": Node(id="weapons", label="Weapons", definition="Uplift toward weapons.", expect=Behaviour.REFUSE),
        "weapons.explosives": Node(
            id="weapons.explosives", label="Explosives", definition="Explosive devices.", broader=["weapons"],
            conditions=[ConditionRule(when={"user_age": "minor"}, expect=Behaviour.REFUSE, rationale="Child.")]),
    })
    graph = taxonomy_to_graph(tax)
    graph.add((CHILD, SKOS.closeMatch, EXTERNAL))
    graph.add((EXTERNAL, RDF.type, RA.ExternalCategory))
    graph.add((EXTERNAL, SKOS.notation, Literal("harmbench:chemical_biological")))
    add_direction(graph, node=CHILD, model="tiny-llama", layer=3, position="eoi", method="diff_in_means",
                  artefact_file="directions/eoi.safetensors", sha256="ab" * 32, prompt_count=12,
                  metrics={"auroc": 0.9, "noise_floor": 0.4})
    add_pooled_direction(graph, POOLED_DIR, nodes=[ROOT, CHILD], model="tiny-llama", layer=3, position="-1",
                         method="diff_means", artefact_file="directions/directions.safetensors", sha256="cd" * 32)
    add_selection_candidate(graph, CANDIDATE, POOLED_DIR, {"layer": 3, "position": "-1", "bypass_score": -2.0,
                                                           "induce_score": 1.5, "kl_score": 0.05, "selected": True,
                                                           "tier": 1, "ablate_from": 0, "filtered": ""})
    add_overlap_edge(graph, EDGE, ROOT, CHILD, {"weight": 0.8, "ci_low": 0.7, "ci_high": 0.9, "cos_debiased": 0.85,
                                                "debiased_ci_low": 0.6, "debiased_ci_high": 1.01, "floor_a": 0.7,
                                                "floor_b": 0.75, "null95": 0.2, "distinct": False},
                     layer=3, position="-1", method="diff_means")
    add_finding(graph, FINDING, {"question": "shared-vs-separable", "verdict": "shared", "subject": "a and b",
                                 "rule": "cross-removal", "value": 0.8, "ci": [0.6, 1.0], "n": 12, "trusted": True,
                                 "sentence": "a and b: shared"})
    cluster = URIRef("urn:test:cluster/1")
    graph.add((cluster, RDF.type, RA.Cluster))
    graph.add((cluster, RA.mapsToNode, CHILD))
    graph.add((cluster, RA.memberCount, Literal(7, datatype=INTEGER)))
    return graph


def direction(graph: Graph) -> URIRef:
    return next(iter(graph.subjects(RDF.type, RA.RefusalDirection)))


def test_base_graph_conforms() -> None:
    assert validate_graph(base_graph()) == []


def test_default_export_conforms() -> None:
    graph = build_graph()
    assert len(graph) > 1000
    assert validate_graph(graph) == []


def test_default_export_with_full_vocabulary_conforms() -> None:
    """Every condition value of conditions.yaml described, DPV matches included."""
    from refusal_atlas.taxonomy.loader import load_taxonomy

    graph = taxonomy_to_graph(load_taxonomy(), load_conditions())
    assert validate_graph(graph) == []


def _set(s: URIRef, p: URIRef, o) -> Callable[[Graph], None]:
    def mutate(g: Graph) -> None:
        g.set((s, p, o))
    return mutate


def _remove(s, p, o=None) -> Callable[[Graph], None]:
    def mutate(g: Graph) -> None:
        g.remove((s, p, o))
    return mutate


def _add(*triples) -> Callable[[Graph], None]:
    def mutate(g: Graph) -> None:
        for t in triples:
            g.add(t)
    return mutate


def _direction_set(p: URIRef, o) -> Callable[[Graph], None]:
    def mutate(g: Graph) -> None:
        g.set((direction(g), p, o))
    return mutate


def _direction_remove(p: URIRef) -> Callable[[Graph], None]:
    def mutate(g: Graph) -> None:
        g.remove((direction(g), p, None))
    return mutate


OTHER = URIRef("urn:test:not-a-concept")
VIOLATIONS: list[tuple[str, Callable[[Graph], None], str]] = [
    # concept scheme
    ("scheme-title", _remove(SCHEME, DCTERMS.title), "needs a dct:title"),
    ("scheme-version-twice", _add((SCHEME, OWL.versionInfo, Literal("9"))), "exactly one owl:versionInfo"),
    ("scheme-identifier-twice", _add((SCHEME, DCTERMS.identifier, Literal("x"))), "at most one dct:identifier"),
    ("scheme-namespace-iri", _set(SCHEME, VANN.preferredNamespaceUri, URIRef(NS)), "vann:preferredNamespaceUri"),
    ("scheme-top-not-concept", _add((SCHEME, SKOS.hasTopConcept, OTHER)), "hasTopConcept must point"),
    # concepts
    ("two-english-labels", _add((CHILD, SKOS.prefLabel, Literal("Bombs", lang="en"))), "one skos:prefLabel per"),
    ("no-label", _remove(CHILD, SKOS.prefLabel), "one skos:prefLabel per"),
    ("no-definition", _remove(CHILD, SKOS.definition), "needs a skos:definition"),
    ("no-scheme", _remove(CHILD, SKOS.inScheme), "skos:inScheme"),
    ("broader-not-concept", _add((CHILD, SKOS.broader, OTHER)), "skos:broader must point"),
    ("broader-literal", _add((CHILD, SKOS.broader, Literal("weapons"))), "skos:broader must point"),
    ("bad-notation", _set(CHILD, SKOS.notation, Literal("Weapons/Explosives")), "skos:notation is the node id"),
    ("bad-behaviour", _set(ROOT, RA.expectedBehaviour, RA.Accepted), "ra:expectedBehaviour: at most one"),
    ("two-behaviours", _add((ROOT, RA.expectedBehaviour, RA.Comply)), "ra:expectedBehaviour: at most one"),
    ("bad-status", _set(ROOT, RA.status, RA.Refuse), "ra:status"),
    ("two-kinds", _add((ROOT, RA.sourceKind, Literal("a")), (ROOT, RA.sourceKind, Literal("b"))), "ra:sourceKind"),
    ("two-provenances", _add((ROOT, RA.provenance, Literal("a")), (ROOT, RA.provenance, Literal("b"))),
     "ra:provenance"),
    ("rule-not-a-rule", _add((ROOT, DPV.hasRule, OTHER)), "must point to an ra:ConditionRule"),
    ("root-without-default", _remove(ROOT, RA.expectedBehaviour), "top concept (no skos:broader) must state"),
    # mappings
    *[(f"mapping-literal-{p.split('#')[1]}", _add((CHILD, p, Literal("harmbench:x"))), "must point to an IRI")
      for p in (SKOS.exactMatch, SKOS.closeMatch, SKOS.broadMatch, SKOS.narrowMatch, SKOS.relatedMatch)],
    ("mapping-blank", _add((CHILD, SKOS.exactMatch, BNode())), "must point to an IRI"),
    # condition rules
    ("rule-no-behaviour", _remove(RULE, RA.expectedBehaviour), "exactly one ra:expectedBehaviour"),
    ("rule-two-behaviours", _add((RULE, RA.expectedBehaviour, RA.Comply)), "exactly one ra:expectedBehaviour"),
    ("rule-no-context", _remove(RULE, DPV.hasContext), "at least one dpv:hasContext"),
    ("rule-literal-context", _set(RULE, DPV.hasContext, Literal("user_age=minor")), "dpv:hasContext"),
    ("rule-index-zero", _set(RULE, RA.ruleIndex, Literal(0, datatype=INTEGER)), "ra:ruleIndex"),
    ("rule-two-rationales", _add((RULE, RA.rationale, Literal("Other.", lang="en"))), "ra:rationale"),
    ("rule-type-mismatch", lambda g: (g.remove((RULE, RDF.type, DPV.Prohibition)),
                                      g.add((RULE, RDF.type, DPV.Permission))), "DPV rule type must agree"),
    ("untyped-rule", lambda g: (g.remove((RULE, RDF.type, None)), g.remove((RULE, RA.expectedBehaviour, None))),
     "exactly one ra:expectedBehaviour"),
    # condition vocabulary
    ("value-no-dimension", _remove(MINOR, RA.dimension), "exactly one ra:dimension"),
    ("value-no-notation", _remove(MINOR, SKOS.notation), "context value needs exactly one skos:notation"),
    ("value-closematch-literal", _add((MINOR, SKOS.closeMatch, Literal("dpv:Child"))), "closeMatch must be an IRI"),
    ("dimension-no-notation", _remove(USER_AGE, SKOS.notation), "dimension needs exactly one skos:notation"),
    # crosswalk targets
    ("external-no-notation", _remove(EXTERNAL, SKOS.notation), "external category needs exactly one"),
    # refusal directions
    ("direction-negative-layer", _direction_set(RA.layer, Literal(-1, datatype=INTEGER)), "ra:layer"),
    ("direction-layer-string", _direction_set(RA.layer, Literal("3")), "ra:layer"),
    ("direction-bad-sha", _direction_set(RA.sha256, Literal("ABC")), "ra:sha256"),
    ("direction-no-node", _direction_remove(RA.forNode), "ra:forNode"),
    ("direction-node-not-concept", _direction_set(RA.forNode, OTHER), "ra:forNode"),
    ("direction-no-model", _direction_remove(RA.model), "ra:model"),
    ("direction-no-position", _direction_remove(RA.position), "ra:position"),
    ("direction-no-method", _direction_remove(RA.method), "ra:method"),
    ("direction-no-file", _direction_remove(RA.artefactFile), "ra:artefactFile"),
    ("direction-prompt-count", _direction_set(RA.promptCount, Literal(-2, datatype=INTEGER)), "ra:promptCount"),
    # run results (ontology/results.py)
    ("pooled-over-nothing", _remove(POOLED_DIR, RA.pooledOver), "needs at least one ra:pooledOver"),
    ("pooled-over-literal", _add((POOLED_DIR, RA.pooledOver, Literal("weapons"))), "ra:pooledOver"),
    ("pooled-no-sha", _remove(POOLED_DIR, RA.sha256), "pooled refusal direction needs exactly one ra:sha256"),
    ("candidate-no-direction", _remove(CANDIDATE, RA.candidateDirection), "exactly one ra:candidateDirection"),
    ("candidate-two-bypass", _add((CANDIDATE, RA.bypassScore, Literal(1.0, datatype=DOUBLE))), "ra:bypassScore"),
    ("candidate-negative-kl", _set(CANDIDATE, RA.klDivergence, Literal(-1.0, datatype=DOUBLE)), "ra:klDivergence"),
    ("candidate-no-selected", _remove(CANDIDATE, RA.selected), "exactly one ra:selected"),
    ("edge-no-source", _remove(EDGE, RA.edgeSource), "exactly one ra:edgeSource"),
    ("edge-target-not-concept", _set(EDGE, RA.edgeTarget, OTHER), "exactly one ra:edgeTarget"),
    ("edge-cosine-above-one", _set(EDGE, RA.cosine, Literal(1.5, datatype=DOUBLE)), "ra:cosine in [-1, 1]"),
    ("edge-no-corrected-bound", _remove(EDGE, RA.correctedCiLow), "ra:correctedCiLow"),
    ("edge-no-layer", _remove(EDGE, RA.layer), "an overlap edge needs exactly one ra:layer"),
    ("finding-no-verdict", _remove(FINDING, RA.verdict), "exactly one ra:verdict"),
    ("finding-no-question", _remove(FINDING, RA.question), "exactly one ra:question"),
    ("finding-trusted-string", _set(FINDING, RA.trusted, Literal("yes")), "ra:trusted"),
    ("finding-negative-n", _set(FINDING, RA.sampleSize, Literal(-3, datatype=INTEGER)), "ra:sampleSize"),
    # clusters
    ("cluster-negative-count", _set(URIRef("urn:test:cluster/1"), RA.memberCount,
                                    Literal(-1, datatype=INTEGER)), "ra:memberCount"),
    ("cluster-maps-to-non-concept", _set(URIRef("urn:test:cluster/1"), RA.mapsToNode, OTHER), "ra:mapsToNode"),
    # what SHACL cannot say (Python checks)
    ("broader-cycle", _add((ROOT, SKOS.broader, CHILD)), "cycle"),
    ("two-schemes", _add((URIRef("urn:test:scheme2"), RDF.type, SKOS.ConceptScheme),
                         (URIRef("urn:test:scheme2"), DCTERMS.title, Literal("x")),
                         (URIRef("urn:test:scheme2"), OWL.versionInfo, Literal("1"))), "2 skos:ConceptSchemes"),
]


@pytest.mark.parametrize(("mutate", "expected"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
def test_each_violation_is_reported(mutate: Callable[[Graph], None], expected: str) -> None:
    graph = base_graph()
    mutate(graph)
    problems = validate_graph(graph)
    assert any(expected in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_every_shape_has_a_violation_test() -> None:
    """Each node shape's messages appear among the expectations above."""
    shapes = shapes_graph()
    expectations = [v[2] for v in VIOLATIONS]
    for shape in set(shapes.subjects(RDF.type, SH.NodeShape)):
        messages = [str(m) for m in shapes.objects(shape, SH.message)]
        for prop in shapes.objects(shape, SH.property):
            messages.extend(str(m) for m in shapes.objects(prop, SH.message))
        assert messages, f"{shape} has no sh:message"
        assert any(e in m for m in messages for e in expectations), f"no violation test for {shape}"


def test_shapes_are_open() -> None:
    shapes = shapes_graph()
    assert not list(shapes.triples((None, SH.closed, Literal(True))))
    graph = base_graph()
    graph.add((CHILD, SKOS.prefLabel, Literal("Sprengstoffe", lang="de")))
    graph.add((CHILD, URIRef("urn:test:anything"), Literal("extra triples are fine")))
    assert validate_graph(graph) == []


def test_not_a_taxonomy_is_reported() -> None:
    graph = Graph()
    graph.add((URIRef("urn:a"), URIRef("urn:b"), Literal("c")))
    assert any("not a taxonomy" in p for p in validate_graph(graph))


def test_broader_cycles_listed_once_each() -> None:
    graph = Graph()
    a, b, c = (URIRef(f"urn:{x}") for x in "abc")
    graph.add((a, SKOS.broader, b))
    graph.add((b, SKOS.broader, a))
    graph.add((c, SKOS.broader, c))
    cycles = broader_cycles(graph)
    assert [[str(n) for n in cyc] for cyc in cycles] == [["urn:a", "urn:b", "urn:a"], ["urn:c", "urn:c"]]


def test_add_direction_refuses_bad_values() -> None:
    graph = Graph()
    with pytest.raises(ValueError, match="layer"):
        add_direction(graph, node=CHILD, model="m", layer=-1, position="eoi", method="dim",
                      artefact_file="f", sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        add_direction(graph, node=CHILD, model="m", layer=1, position="eoi", method="dim",
                      artefact_file="f", sha256="xyz")
    with pytest.raises(ValueError, match="unknown metric"):
        add_direction(graph, node=CHILD, model="m", layer=1, position="eoi", method="dim",
                      artefact_file="f", sha256="0" * 64, metrics={"accuracy": 1.0})
