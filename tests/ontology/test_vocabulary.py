"""Closed namespaces, our vocabulary file, and AIRO 1.0 conformance of what we write."""

from __future__ import annotations

from pathlib import Path
from typing import get_type_hints

import pytest
from rdflib import RDF, RDFS, SKOS, Graph, Literal, URIRef

from refusal_atlas import paths
from refusal_atlas.ontology.export import build_graph
from refusal_atlas.ontology.namespaces import AIRO, DPV, LOC, RA, RISK
from refusal_atlas.taxonomy.model import Behaviour

REPO = Path(__file__).resolve().parents[2]
AIRO_REFERENCE = REPO.parent / "shared" / "reference" / "airo-1.0.ttl"


def terms(namespace: type) -> list[str]:
    return [name for name in get_type_hints(namespace) if not name.startswith("_")]


@pytest.fixture(scope="module")
def vocabulary() -> Graph:
    return Graph().parse(paths.ontology_dir() / "refusal-atlas.ttl", format="turtle")


@pytest.mark.parametrize(("namespace", "typo"), [
    (AIRO, "hasRiskSource"), (AIRO, "AffectedStakeholder"), (DPV, "Minor"), (RISK, "RiskSourse"),
    (RA, "expectedBehavior"), (LOC, "XX"),
])
def test_typos_fail(namespace: type, typo: str) -> None:
    with pytest.raises(AttributeError):
        getattr(namespace, typo)


def test_known_terms_resolve() -> None:
    assert str(AIRO.RiskSource) == "https://w3id.org/airo#RiskSource"
    assert str(DPV.Child) == "https://w3id.org/dpv#Child"
    assert str(RISK.PotentialRiskSource) == "https://w3id.org/dpv/risk#PotentialRiskSource"
    assert str(LOC.DE) == "https://w3id.org/dpv/loc#DE"
    assert str(RA.expectedBehaviour) == "https://w3id.org/refusal-atlas/vocab#expectedBehaviour"


def test_every_ra_term_is_defined_with_label_and_definition(vocabulary: Graph) -> None:
    for name in terms(RA):
        term = RA[name]
        assert (term, RDF.type, None) in vocabulary, f"ra:{name} not defined in refusal-atlas.ttl"
        assert any(isinstance(o, Literal) and o.language == "en" for o in vocabulary.objects(term, RDFS.label)), name
        assert any(isinstance(o, Literal) and o.language == "en"
                   for o in vocabulary.objects(term, SKOS.definition)), name


def test_vocabulary_mints_nothing_python_does_not_know(vocabulary: Graph) -> None:
    minted = {str(t) for t in vocabulary.all_nodes() if isinstance(t, URIRef) and str(t).startswith(str(RA._NS))}
    assert minted == {str(RA[name]) for name in terms(RA)}


def test_behaviour_individuals_match_the_model(vocabulary: Graph) -> None:
    by_notation = {str(vocabulary.value(s, SKOS.notation)): s for s in vocabulary.subjects(RDF.type, RA.Behaviour)}
    assert set(by_notation) == {b.value for b in Behaviour}
    for behaviour in Behaviour:
        rank = vocabulary.value(by_notation[behaviour.value], RA.restrictiveness)
        assert rank is not None and rank.toPython() == behaviour.restrictiveness


def test_vocabulary_links_to_dpv(vocabulary: Graph) -> None:
    assert (RA.Refuse, SKOS.closeMatch, DPV.Prohibition) in vocabulary
    assert (RA.Comply, SKOS.closeMatch, DPV.Permission) in vocabulary
    assert (RA.ConditionRule, RDFS.subClassOf, DPV.Rule) in vocabulary


def test_airo_terms_we_use_exist_in_airo_1_0() -> None:
    if not AIRO_REFERENCE.is_file():
        pytest.skip(f"AIRO 1.0 reference copy not found at {AIRO_REFERENCE} (expected beside the repository "
                    "in ../shared/reference/)")
    airo = Graph().parse(AIRO_REFERENCE, format="turtle")
    defined = {str(s) for s in airo.subjects(RDF.type, None) if str(s).startswith(str(AIRO._NS))}
    assert "https://w3id.org/airo#hasRiskSource" not in defined
    assert "https://w3id.org/airo#AffectedStakeholder" not in defined
    ours = Graph()
    ours += build_graph()
    ours += Graph().parse(paths.ontology_dir() / "refusal-atlas.ttl", format="turtle")
    used = {str(t) for t in ours.all_nodes() if isinstance(t, URIRef) and str(t).startswith(str(AIRO._NS))}
    used |= {str(p) for p in ours.predicates() if str(p).startswith(str(AIRO._NS))}
    used |= {str(AIRO[name]) for name in terms(AIRO)}
    assert "https://w3id.org/airo#RiskSource" in used
    missing = sorted(used - defined)
    assert not missing, f"AIRO terms not in AIRO 1.0: {missing}"
