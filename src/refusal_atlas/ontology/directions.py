"""Describe refusal directions in RDF (for atlas.ttl): metadata, file and hash, never the vector.

A direction is an `ra:RefusalDirection` linked to its taxonomy node by `ra:forNode`, with the
model, layer, token position and method it came from, its metrics, and the safetensors file
(path relative to the atlas folder) plus that file's sha256, so a reader can check that the
file on disk is the one described. `rash:RefusalDirectionShape` in shapes.ttl validates it.
"""

from __future__ import annotations

import re
from pathlib import Path

from rdflib import RDF, XSD, Graph, Literal, URIRef

from refusal_atlas.hashing import sha256, text_sha256
from refusal_atlas.io import brief
from refusal_atlas.ontology.namespaces import RA

METRICS: dict[str, URIRef] = {
    "noise_floor": RA.noiseFloor,
    "split_half_cosine": RA.splitHalfCosine,
    "auroc": RA.auroc,
    "reliability": RA.reliability,
    "norm": RA.norm,
}
SHA256 = re.compile(r"[0-9a-f]{64}")  # fullmatch only


def sha256_file(path: Path | str) -> str:
    digest = sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def direction_iri(node: URIRef, model: str, layer: int, position: str, method: str) -> URIRef:
    """Deterministic: the same (node, model, layer, position, method) always gets the same IRI."""
    key = text_sha256(f"{model}\n{layer}\n{position}\n{method}")[:16]
    return URIRef(f"{node}/direction/{key}")


def add_direction(
    graph: Graph,
    *,
    node: URIRef,
    model: str,
    layer: int,
    position: str,
    method: str,
    artefact_file: str,
    sha256: str,
    prompt_count: int | None = None,
    model_revision: str | None = None,
    metrics: dict[str, float] | None = None,
    direction_set: str | None = None,
) -> URIRef:
    """Add one direction's description to `graph`; returns its IRI. (Selection scores belong to a
    `ra:SelectionCandidate`, `results.add_selection_candidate`, not to the direction.)"""
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    if not SHA256.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 lower-case hex digits, got {brief(sha256)}")
    unknown = set(metrics or {}) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {', '.join(METRICS)}")
    subject = direction_iri(node, model, layer, position, method)
    graph.add((subject, RDF.type, RA.RefusalDirection))
    graph.add((subject, RA.forNode, node))
    graph.add((subject, RA.model, Literal(model)))
    graph.add((subject, RA.layer, Literal(int(layer), datatype=XSD.integer)))
    graph.add((subject, RA.position, Literal(position)))
    graph.add((subject, RA.method, Literal(method)))
    graph.add((subject, RA.artefactFile, Literal(artefact_file)))
    graph.add((subject, RA.sha256, Literal(sha256)))
    if prompt_count is not None:
        graph.add((subject, RA.promptCount, Literal(int(prompt_count), datatype=XSD.integer)))
    if model_revision is not None:
        graph.add((subject, RA.modelRevision, Literal(model_revision)))
    if direction_set is not None:
        graph.add((subject, RA.directionSet, Literal(direction_set)))
    for name, value in sorted((metrics or {}).items()):
        graph.add((subject, METRICS[name], Literal(float(value), datatype=XSD.double)))
    return subject
