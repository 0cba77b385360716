"""Describe what a run found in RDF (for atlas.ttl): the pooled direction, the direction selection's
candidates and its choice, the overlap graph's edges, and the findings. Shapes: shapes.ttl.

- `ra:PooledRefusalDirection` (a `ra:RefusalDirection` with `ra:pooledOver` its nodes instead of one
  `ra:forNode`): the direction the causal stage selects a layer and position for;
- `ra:SelectionCandidate`: one (layer, position, ablation scope) the selection scored, with
  `ra:bypassScore`, `ra:induceScore`, `ra:klDivergence`, `ra:tier`, `ra:filteredBy`, `ra:selected`,
  linked to the direction it scores by `ra:candidateDirection`; the run points to the chosen
  direction by `ra:selectedDirection`;
- `ra:OverlapEdge`: two nodes (`ra:edgeSource`, `ra:edgeTarget`) whose directions overlap beyond
  noise, with the raw cosine and its interval (`ra:cosine`, `ra:ciLow`, `ra:ciHigh`), the
  noise-corrected one (`ra:correctedCosine` …), both nodes' floors and the chance null;
- `ra:Finding`: question, verdict, rule, value with interval, sample size, trusted, sentence.
Numbers that are missing or not finite are left out (never written as NaN).
"""

from __future__ import annotations

import math
from typing import Any

from rdflib import RDF, XSD, Graph, Literal, URIRef
from rdflib.namespace import DCTERMS

from refusal_atlas.ontology.namespaces import RA

__all__ = ["add_finding", "add_overlap_edge", "add_pooled_direction", "add_selection_candidate", "number"]


def number(value: Any) -> Literal | None:
    """An xsd:double literal, or None for a missing or non-finite value."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else Literal(round(x, 6), datatype=XSD.double)


def _integer(value: Any) -> int | None:
    """An int, or None for a missing or non-finite value."""
    return None if number(value) is None else int(float(value))


def _put(graph: Graph, subject: URIRef, values: dict[URIRef, Any]) -> None:
    for prop, value in values.items():
        if isinstance(value, bool):
            graph.add((subject, prop, Literal(value, datatype=XSD.boolean)))
        elif isinstance(value, int):
            graph.add((subject, prop, Literal(value, datatype=XSD.integer)))
        elif isinstance(value, str):
            if value:
                graph.add((subject, prop, Literal(value)))
        elif (lit := number(value)) is not None:
            graph.add((subject, prop, lit))


def add_pooled_direction(graph: Graph, subject: URIRef, *, nodes: list[URIRef], model: str, layer: int,
                         position: str, method: str, artefact_file: str, sha256: str,
                         metrics: dict[URIRef, Any] | None = None) -> URIRef:
    """The pooled direction at one layer and position, pooling `nodes`."""
    # typed by its own class only: ra:RefusalDirection's shape asks for exactly one ra:forNode (the vocabulary
    # makes it a subclass, so a reasoner still finds it among the refusal directions)
    graph.add((subject, RDF.type, RA.PooledRefusalDirection))
    for node in nodes:
        graph.add((subject, RA.pooledOver, node))
    _put(graph, subject, {RA.model: model, RA.layer: int(layer), RA.position: position, RA.method: method,
                          RA.artefactFile: artefact_file, RA.sha256: sha256, **(metrics or {})})
    return subject


def add_selection_candidate(graph: Graph, subject: URIRef, direction: URIRef, row: dict[str, Any]) -> URIRef:
    """One row of causal/selection.parquet (store column names) as a `ra:SelectionCandidate`."""
    graph.add((subject, RDF.type, RA.SelectionCandidate))
    graph.add((subject, RA.candidateDirection, direction))
    tier, start = _integer(row.get("tier")), _integer(row.get("ablate_from"))
    _put(graph, subject, {
        RA.layer: int(row["layer"]), RA.position: str(row["position"]),
        RA.bypassScore: row.get("bypass_score"), RA.induceScore: row.get("induce_score"),
        RA.klDivergence: row.get("kl_score"), RA.selected: row.get("selected") in (True, 1),
        RA.filteredBy: str(row.get("filtered") or ""),
        **({RA.tier: tier} if tier is not None else {}),
        **({RA.ablateFrom: start} if start is not None else {}),
    })
    return subject


def add_overlap_edge(graph: Graph, subject: URIRef, source: URIRef, target: URIRef, edge: dict[str, Any], *,
                     layer: int, position: str, method: str) -> URIRef:
    """One overlap edge of overlap.graphml (its attribute names) as a `ra:OverlapEdge`."""
    graph.add((subject, RDF.type, RA.OverlapEdge))
    graph.add((subject, RA.edgeSource, source))
    graph.add((subject, RA.edgeTarget, target))
    distinct = edge.get("distinct")
    _put(graph, subject, {
        RA.layer: int(layer), RA.position: position, RA.method: method,
        RA.cosine: edge.get("weight"), RA.ciLow: edge.get("ci_low"), RA.ciHigh: edge.get("ci_high"),
        RA.correctedCosine: edge.get("cos_debiased"), RA.correctedCiLow: edge.get("debiased_ci_low"),
        RA.correctedCiHigh: edge.get("debiased_ci_high"), RA.sourceFloor: edge.get("floor_a"),
        RA.targetFloor: edge.get("floor_b"), RA.chanceCosine95: edge.get("null95"),
        **({RA.distinct: distinct in (True, "True", "true", 1)} if distinct is not None else {}),
    })
    return subject


def add_finding(graph: Graph, subject: URIRef, finding: dict[str, Any]) -> URIRef:
    """One finding of findings.json as a `ra:Finding`."""
    graph.add((subject, RDF.type, RA.Finding))
    ci = finding.get("ci")
    low, high = (ci[0], ci[1]) if isinstance(ci, list | tuple) and len(ci) == 2 else (None, None)
    n = _integer(finding.get("n"))
    _put(graph, subject, {
        RA.question: str(finding.get("question") or ""), RA.verdict: str(finding.get("verdict") or "inconclusive"),
        RA.findingSubject: str(finding.get("subject") or ""), RA.rule: str(finding.get("rule") or ""),
        RA.value: finding.get("value"), RA.ciLow: low, RA.ciHigh: high,
        RA.trusted: finding.get("trusted") is True, DCTERMS.description: str(finding.get("sentence") or ""),
        RA.rationale: str(finding.get("rule_text") or ""),
        **({RA.sampleSize: n} if n is not None and n >= 0 else {}),
    })
    return subject
