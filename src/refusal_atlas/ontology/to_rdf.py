"""Taxonomy -> RDF in the SKOS + AIRO + DPV style (the inverse is `from_rdf`).

Modelling, in short (docs/ontology.md has the long form):

- the taxonomy is one `skos:ConceptScheme`; each node a `skos:Concept` and `airo:RiskSource`
  (plus `risk:PotentialRiskSource` when it carries condition rules: it is a risk source only
  in some contexts);
- each condition rule is a DPV rule whose type says what answering is under that context:
  refuse -> `dpv:Prohibition`, comply -> `dpv:Permission`, comply_with_caveats and redirect ->
  `dpv:Obligation` (answering is allowed only while meeting an obligation: add the caveats, or
  point to the right help). The exact behaviour stays in `ra:expectedBehaviour`, so nothing is lost;
- a rule's contexts (`dpv:hasContext`) are DPV terms where the condition vocabulary names one that
  stands for exactly one value, otherwise our minted `rac:<dimension>/<value>` terms; every minted
  value is described in the graph (dimension, notation, `skos:closeMatch` to its DPV term), which is
  what lets `from_rdf` map a DPV term back to its dimension and value;
- crosswalk rows become SKOS mapping triples to the external category's IRI;
- list order that YAML has and RDF sets lack (several parents, examples) is kept in a small JSON
  literal only when it differs from the sorted order a reader would otherwise reconstruct.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from rdflib import OWL, RDF, SKOS, XSD, Graph, Literal, URIRef
from rdflib.namespace import DCTERMS, VANN

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import brief
from refusal_atlas.ontology import iris
from refusal_atlas.ontology.namespaces import AIRO, CONDITION_IRI, DEFAULT_TAXONOMY_IRI, DPV, LOC, RA, RISK
from refusal_atlas.taxonomy.crosswalk import EXTERNAL_BASE, EXTERNAL_SOURCES
from refusal_atlas.taxonomy.crosswalk import external_iri as default_external_iri
from refusal_atlas.taxonomy.model import Behaviour, Node, Scheme, Taxonomy

RULE_TYPE: dict[Behaviour, URIRef] = {
    Behaviour.REFUSE: DPV.Prohibition,
    Behaviour.COMPLY: DPV.Permission,
    Behaviour.COMPLY_WITH_CAVEATS: DPV.Obligation,
    Behaviour.REDIRECT: DPV.Obligation,
}

MAPPING_PREDICATES: dict[str, URIRef] = {
    "skos:exactMatch": SKOS.exactMatch,
    "skos:closeMatch": SKOS.closeMatch,
    "skos:broadMatch": SKOS.broadMatch,
    "skos:narrowMatch": SKOS.narrowMatch,
    "skos:relatedMatch": SKOS.relatedMatch,
}

EXTERNAL_PREFIXES: dict[str, str] = {}


def bind_prefixes(graph: Graph, namespace: str | None = None) -> Graph:
    """Bind the prefixes we write (and SPARQL queries may use) on `graph`."""
    graph.bind("ra", RA._NS, replace=True)
    graph.bind("rac", CONDITION_IRI, replace=True)
    graph.bind("airo", AIRO._NS, replace=True)
    graph.bind("dpv", DPV._NS, replace=True)
    graph.bind("risk", RISK._NS, replace=True)
    graph.bind("loc", LOC._NS, replace=True)
    graph.bind("skos", SKOS, replace=True)
    graph.bind("dct", DCTERMS, replace=True)
    graph.bind("owl", OWL, replace=True)
    graph.bind("vann", VANN, replace=True)
    graph.bind("tax", namespace or DEFAULT_TAXONOMY_IRI, replace=True)
    for prefix, base in _external_prefixes().items():
        graph.bind(prefix, base, replace=True)
    return graph


def _external_prefixes() -> dict[str, str]:
    """`harmbench:` etc. for the minted external-category IRIs (owned by the crosswalk module)."""
    if not EXTERNAL_PREFIXES:

        EXTERNAL_PREFIXES.update({source: f"{EXTERNAL_BASE}{source}/" for source in EXTERNAL_SOURCES})
    return EXTERNAL_PREFIXES


def taxonomy_to_graph(
    tax: Taxonomy,
    conditions: Any | None = None,
    crosswalks: Iterable[Any] | None = None,
    *,
    external_iri: Callable[[str], str] | None = None,
) -> Graph:
    """The taxonomy as an rdflib Graph.

    `conditions` (a ConditionVocabulary) adds the labels, definitions and DPV matches of every
    condition value; `crosswalks` (Mapping rows) add SKOS mapping triples. `external_iri` turns an
    external CURIE into an IRI (default: `refusal_atlas.taxonomy.crosswalk.external_iri`).
    """
    ns = tax.scheme.namespace
    graph = bind_prefixes(Graph(), ns)
    scheme = iris.scheme_iri(ns)
    _add_scheme(graph, scheme, tax.scheme)
    direct = _direct_context_terms(conditions)
    used: set[tuple[str, str]] = set()
    for node in tax.nodes.values():
        _add_node(graph, scheme, ns, node, direct, used)
    _add_condition_vocabulary(graph, conditions, used)
    if crosswalks is not None:
        _add_crosswalks(graph, tax, list(crosswalks), external_iri)
    return graph


def _add_scheme(graph: Graph, scheme: URIRef, meta: Scheme) -> None:
    graph.add((scheme, RDF.type, SKOS.ConceptScheme))
    graph.add((scheme, DCTERMS.identifier, Literal(meta.id)))
    graph.add((scheme, DCTERMS.title, Literal(meta.title, lang="en")))
    graph.add((scheme, OWL.versionInfo, Literal(meta.version)))
    graph.add((scheme, VANN.preferredNamespaceUri, Literal(meta.namespace)))
    if meta.license is not None:
        graph.add((scheme, DCTERMS.license, _iri_or_literal(meta.license)))
    if meta.description is not None:
        graph.add((scheme, DCTERMS.description, Literal(meta.description, lang="en")))


def _iri_or_literal(text: str) -> URIRef | Literal:
    """Licences are IRIs when they look like one (https://spdx.org/licenses/...), otherwise names."""
    if text.startswith(("http://", "https://")) and not any(c in text for c in ' <>"{}|\\^`'):
        return URIRef(text)
    return Literal(text)


def _add_node(
    graph: Graph,
    scheme: URIRef,
    ns: str,
    node: Node,
    direct: dict[tuple[str, str], URIRef],
    used: set[tuple[str, str]],
) -> None:
    subject = iris.node_iri(ns, node.id)
    graph.add((subject, RDF.type, SKOS.Concept))
    graph.add((subject, RDF.type, AIRO.RiskSource))
    if node.conditions:
        graph.add((subject, RDF.type, RISK.PotentialRiskSource))
    graph.add((subject, SKOS.inScheme, scheme))
    graph.add((subject, SKOS.notation, Literal(node.id)))
    graph.add((subject, SKOS.prefLabel, Literal(node.label, lang="en")))
    graph.add((subject, SKOS.definition, Literal(node.definition, lang="en")))
    for parent in node.broader:
        graph.add((subject, SKOS.broader, iris.node_iri(ns, parent)))
    if not node.broader:
        graph.add((subject, SKOS.topConceptOf, scheme))
        graph.add((scheme, SKOS.hasTopConcept, subject))
    if _needs_order(node.broader):
        graph.add((subject, RA.broaderOrder, Literal(json.dumps(node.broader, ensure_ascii=False))))
    if node.kind is not None:
        graph.add((subject, RA.sourceKind, Literal(node.kind)))
    if node.expect is not None:
        graph.add((subject, RA.expectedBehaviour, iris.BEHAVIOUR_IRI[node.expect]))
    graph.add((subject, RA.status, iris.STATUS_IRI[node.status]))
    if node.status.value == "deprecated":
        graph.add((subject, OWL.deprecated, Literal(True)))
    for example in node.examples:
        graph.add((subject, SKOS.example, Literal(example, lang="en")))
    if _needs_order(node.examples):
        graph.add((subject, RA.exampleOrder, Literal(json.dumps(node.examples, ensure_ascii=False))))
    if node.provenance is not None:
        graph.add((subject, RA.provenance, Literal(node.provenance)))
    for index, rule in enumerate(node.conditions, start=1):
        rule_node = iris.rule_iri(ns, node.id, index)
        graph.add((subject, DPV.hasRule, rule_node))
        graph.add((rule_node, RDF.type, RA.ConditionRule))
        graph.add((rule_node, RDF.type, RULE_TYPE[rule.expect]))
        graph.add((rule_node, RA.ruleIndex, Literal(index, datatype=XSD.integer)))
        graph.add((rule_node, RA.expectedBehaviour, iris.BEHAVIOUR_IRI[rule.expect]))
        for dim, value in rule.when.items():
            used.add((dim, value))
            graph.add((rule_node, DPV.hasContext, direct.get((dim, value)) or iris.value_iri(dim, value)))
        if rule.rationale is not None:
            graph.add((rule_node, RA.rationale, Literal(rule.rationale, lang="en")))


def _needs_order(items: list[str]) -> bool:
    """True when a reader sorting the RDF set would not get `items` back (unsorted or duplicates)."""
    return len(items) > 1 and items != sorted(set(items))


def _direct_context_terms(conditions: Any | None) -> dict[tuple[str, str], URIRef]:
    """(dim, value) -> DPV IRI, for DPV IRIs that stand for exactly one value of the vocabulary."""
    if conditions is None:
        return {}
    owners: dict[str, list[tuple[str, str]]] = {}
    for dim, dimension in conditions.dimensions.items():
        for value, spec in dimension.values.items():
            if spec.dpv:
                owners.setdefault(spec.dpv, []).append((dim, value))
    return {pairs[0]: URIRef(dpv) for dpv, pairs in owners.items() if len(pairs) == 1}


def _add_condition_vocabulary(graph: Graph, conditions: Any | None, used: set[tuple[str, str]]) -> None:
    """Describe every condition value the graph may point at (all of the vocabulary, plus any used)."""
    described: set[tuple[str, str]] = set()
    if conditions is not None:
        for dim, dimension in conditions.dimensions.items():
            dim_node = _add_dimension(graph, dim)
            graph.add((dim_node, SKOS.prefLabel, Literal(dimension.label, lang="en")))
            graph.add((dim_node, SKOS.definition, Literal(dimension.definition, lang="en")))
            for value, spec in dimension.values.items():
                value_node = _add_value(graph, dim, value)
                graph.add((value_node, SKOS.prefLabel, Literal(spec.label, lang="en")))
                graph.add((value_node, SKOS.definition, Literal(spec.definition, lang="en")))
                if spec.dpv:
                    graph.add((value_node, SKOS.closeMatch, URIRef(spec.dpv)))
                described.add((dim, value))
    for dim, value in sorted(used - described):
        _add_dimension(graph, dim)
        _add_value(graph, dim, value)


def _add_dimension(graph: Graph, dim: str) -> URIRef:
    node = iris.dimension_iri(dim)
    graph.add((node, RDF.type, RA.ConditionDimension))
    graph.add((node, SKOS.notation, Literal(dim)))
    return node


def _add_value(graph: Graph, dim: str, value: str) -> URIRef:
    node = iris.value_iri(dim, value)
    graph.add((node, RDF.type, RA.ContextValue))
    graph.add((node, RDF.type, DPV.Context))
    graph.add((node, RA.dimension, iris.dimension_iri(dim)))
    graph.add((node, SKOS.notation, Literal(value)))
    return node


def _add_crosswalks(
    graph: Graph, tax: Taxonomy, mappings: list[Any], external_iri: Callable[[str], str] | None
) -> None:
    if external_iri is None:

        external_iri = default_external_iri
    ns = tax.scheme.namespace
    for row in mappings:
        node_id = _mapped_node_id(tax, str(getattr(row, "node_id", row.subject_id)))
        predicate = MAPPING_PREDICATES.get(str(row.predicate_id))
        if predicate is None:
            raise AtlasError(f"crosswalk row {row.subject_id} {row.predicate_id} {row.object_id}: predicate "
                             f"must be one of {', '.join(MAPPING_PREDICATES)}")
        target = URIRef(external_iri(str(row.object_id)))
        graph.add((iris.node_iri(ns, node_id), predicate, target))
        graph.add((target, RDF.type, RA.ExternalCategory))
        graph.add((target, SKOS.notation, Literal(str(row.object_id))))
        label = getattr(row, "object_label", None)
        if label:
            graph.add((target, SKOS.prefLabel, Literal(str(label), lang="en")))


def _mapped_node_id(tax: Taxonomy, subject: str) -> str:
    """A crosswalk subject is a node id, optionally behind a CURIE prefix (`ra:weapons`)."""
    if subject in tax.nodes:
        return subject
    _, _, local = subject.partition(":")
    if local in tax.nodes:
        return local
    if subject.startswith(tax.scheme.namespace) and subject[len(tax.scheme.namespace):] in tax.nodes:
        return subject[len(tax.scheme.namespace):]
    raise AtlasError(f"crosswalk subject {brief(subject)} is not a node of the taxonomy; fix the SSSOM row "
                     "or add the node")
