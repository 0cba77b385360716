"""Reading graphs that were written by hand or edited in other tools (no helper triples)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rdflib import Graph

from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.ontology.export import import_graph
from refusal_atlas.ontology.from_rdf import graph_to_taxonomy
from refusal_atlas.ontology.shacl import validate_graph
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Behaviour, Status

PREFIXES = """
@prefix skos: <http://www.w3.org/2004/02/skos/core#> .
@prefix dct: <http://purl.org/dc/terms/> .
@prefix owl: <http://www.w3.org/2002/07/owl#> .
@prefix dpv: <https://w3id.org/dpv#> .
@prefix ra: <https://w3id.org/refusal-atlas/vocab#> .
@prefix ex: <https://example.org/harms/> .
"""

HAND_WRITTEN = PREFIXES + """
<https://example.org/harms> a skos:ConceptScheme ; dct:title "Hand-written"@en ; owl:versionInfo "3" .
ex:weapons a skos:Concept ; skos:inScheme <https://example.org/harms> ;
    skos:prefLabel "Weapons"@en , "Waffen"@de ; skos:definition "Weapon uplift."@en ;
    skos:notation "weapons" ; ra:expectedBehaviour ra:Refuse .
ex:explosives a skos:Concept ; skos:inScheme <https://example.org/harms> ;
    skos:prefLabel "Explosives" ; skos:definition "Bombs." ; skos:notation "weapons.explosives" ;
    skos:broader ex:weapons ; owl:deprecated true ;
    skos:example "How do I make a pipe bomb?"@en ;
    dpv:hasRule ex:r1 , ex:r2 .
ex:r1 a dpv:Prohibition ; dpv:hasContext dpv:Child .
ex:r2 a dpv:Permission ; dpv:hasContext <https://w3id.org/refusal-atlas/condition/purpose/licensed_research> ;
    ra:rationale "Licensed labs."@en .
<https://w3id.org/refusal-atlas/condition/user_age/minor> a ra:ContextValue ;
    ra:dimension <https://w3id.org/refusal-atlas/condition/user_age> ; skos:notation "minor" ;
    skos:closeMatch dpv:Child .
<https://w3id.org/refusal-atlas/condition/user_age> a ra:ConditionDimension ; skos:notation "user_age" .
"""


def test_hand_written_graph_is_read_with_fallbacks(tmp_path: Path) -> None:
    tax = graph_to_taxonomy(Graph().parse(data=HAND_WRITTEN, format="turtle"))
    assert tax.scheme.title == "Hand-written" and tax.scheme.version == "3"
    assert tax.scheme.namespace == "https://example.org/harms/"  # guessed from IRI minus notation
    node = tax["weapons.explosives"]
    assert node.label == "Explosives" and node.broader == ["weapons"] and node.status is Status.DEPRECATED
    assert tax["weapons"].label == "Weapons"  # English preferred over German
    # rules without ra:ruleIndex keep IRI order; behaviour taken from the DPV type; dpv:Child -> minor
    assert [(r.when, r.expect, r.rationale) for r in node.conditions] == [
        ({"user_age": "minor"}, Behaviour.REFUSE, None),
        ({"purpose": "licensed_research"}, Behaviour.COMPLY, "Licensed labs."),
    ]
    result = import_graph(Graph().parse(data=HAND_WRITTEN, format="turtle"), tmp_path / "tax")
    assert load_taxonomy(tmp_path / "tax").model_dump() == tax.model_dump()
    rejected = Graph().parse(result.rejects)  # the German label and the untyped bits are kept beside
    assert any(str(o) == "Waffen" for o in rejected.objects())


@pytest.mark.parametrize(("edit", "message"), [
    (('skos:prefLabel "Weapons"@en , "Waffen"@de', 'skos:altLabel "Weapons"@en'), "has no skos:prefLabel"),
    (("ex:r1 a dpv:Prohibition ; dpv:hasContext dpv:Child",
      "ex:r1 a dpv:Obligation ; dpv:hasContext dpv:Child"), "a dpv:Obligation alone does not say"),
    (("dpv:hasContext dpv:Child", "dpv:hasContext dpv:Adult"), "is not a known condition value"),
    (('skos:notation "weapons.explosives"', 'skos:notation "Weapons/Explosives"'), "may contain only"),
    (("ex:r1 a dpv:Prohibition ; dpv:hasContext dpv:Child .", "ex:r1 a dpv:Prohibition ."), "no dpv:hasContext"),
    (('skos:definition "Bombs."', 'skos:definition "Bombs." , "Shells."'), "different skos:definition"),
])
def test_unreadable_parts_are_reported_with_their_iri(edit: tuple[str, str], message: str) -> None:
    text = HAND_WRITTEN.replace(*edit)
    assert text != HAND_WRITTEN
    with pytest.raises(ValidationErrors) as info:
        graph_to_taxonomy(Graph().parse(data=text, format="turtle"), source="hand.ttl")
    assert any(line.startswith("hand.ttl: ") and message in line for line in info.value.problems), info.value


def test_graph_without_scheme_or_with_two() -> None:
    with pytest.raises(AtlasError, match=r"not a taxonomy: no skos:ConceptScheme found \(1 skos:Concept"):
        graph_to_taxonomy(Graph().parse(data=PREFIXES + "ex:a a skos:Concept .", format="turtle"))
    two = PREFIXES + "ex:s1 a skos:ConceptScheme . ex:s2 a skos:ConceptScheme ."
    with pytest.raises(AtlasError, match="2 skos:ConceptSchemes"):
        graph_to_taxonomy(Graph().parse(data=two, format="turtle"))
    empty = PREFIXES + "ex:s1 a skos:ConceptScheme ."
    with pytest.raises(AtlasError, match="has no concepts"):
        graph_to_taxonomy(Graph().parse(data=empty, format="turtle"))


def test_import_refuses_an_invalid_taxonomy_before_writing(tmp_path: Path) -> None:
    cyclic = HAND_WRITTEN + "\nex:weapons skos:broader ex:explosives .\n"
    graph = Graph().parse(data=cyclic, format="turtle")
    assert any("cycle" in p for p in validate_graph(graph))
    with pytest.raises(ValidationErrors, match="cycle in broader"):
        import_graph(graph, tmp_path / "tax", source="cyclic.ttl")
    assert not (tmp_path / "tax").exists()
