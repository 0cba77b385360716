"""atlas.ttl: the taxonomy graph plus what the run found, linked to the nodes it is about.

- the taxonomy (the run's taxonomy.ttl, or `taxonomy_to_graph` of the given taxonomy) with its
  condition rules and crosswalks;
- every bottom-up cluster as an `ra:Cluster` (`ra:clusterLabel`, `ra:memberCount`) linked to its
  best node(s) by `ra:mapsToNode`;
- every refusal direction as an `ra:RefusalDirection` linked to its node (`ra:forNode`) with the
  model, layer, token position, method, prompt count, noise floor, AUROC and selection scores,
  and the artefact it lives in (`ra:artefactFile`, `ra:sha256`; `dct:identifier` is the tensor key
  inside that file, the row is the index of `ra:layer` in directions.json's `layers`). The vectors
  themselves never go into RDF.

Run resources are named under `https://w3id.org/refusal-atlas/atlas/<run id>/`, the run id being
a hash of the direction artefact (or the manifest), so two atlases never share IRIs.

Terms the vocabulary may add later (`ra:norm`, `ra:reliability`, `ra:mappingScore`) are written
as soon as `RA` defines them; until then those numbers stay in directions.json / mapping files.
The pooled direction (`@pooled`) has no taxonomy node and is left out of the graph.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rdflib import RDF, RDFS, XSD, Graph, Literal, URIRef
from rdflib.namespace import DCTERMS, PROV

from refusal_atlas.atlas.sae_links import add_sae_features
from refusal_atlas.atlas.store import AtlasStore, model_identity
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256, text_sha256
from refusal_atlas.lm.positions import position_label
from refusal_atlas.ontology import iris
from refusal_atlas.ontology.directions import add_direction
from refusal_atlas.ontology.io import parse_rdf, write_graph
from refusal_atlas.ontology.namespaces import RA
from refusal_atlas.ontology.shacl import validate_graph
from refusal_atlas.ontology.to_rdf import taxonomy_to_graph
from refusal_atlas.taxonomy.conditions import load_conditions
from refusal_atlas.taxonomy.crosswalk import load_crosswalks
from refusal_atlas.taxonomy.model import Taxonomy

ATLAS_BASE = "https://w3id.org/refusal-atlas/atlas/"
DIRECTIONS_FILE = "directions/directions.safetensors"
DEFAULT_METHODS = ("diff_means",)


def optional_term(name: str) -> URIRef | None:
    """`RA.<name>` when the vocabulary defines it (RA is closed: unknown names raise), else None."""
    try:
        return getattr(RA, name)
    except AttributeError:
        return None


def run_id(store: AtlasStore) -> str:
    """A short stable id for this atlas: hash of its directions artefact, else of its manifest."""
    for rel in (DIRECTIONS_FILE, "manifest.json", "taxonomy.ttl"):
        path = store.root / rel
        if path.is_file():
            return file_sha256(path)[:16]
    return text_sha256(str(store.root))[:16]


def _finite(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)


def _num(value: Any) -> Literal | None:
    x = _finite(value)
    return None if x is None else Literal(x, datatype=XSD.double)


def build_atlas_graph(
    out_dir: str | Path | AtlasStore,
    *,
    taxonomy: Taxonomy | None = None,
    methods: tuple[str, ...] = DEFAULT_METHODS,
) -> Graph:
    """The atlas graph of an output folder (taxonomy + clusters + directions)."""
    store = out_dir if isinstance(out_dir, AtlasStore) else AtlasStore.open(out_dir)
    graph, tax = _taxonomy_graph(store, taxonomy)
    ns = tax.scheme.namespace
    base = f"{ATLAS_BASE}{run_id(store)}/"
    graph.bind("atlas", base, replace=True)
    graph.bind("prov", PROV, replace=True)
    atlas = URIRef(base)
    graph.add((atlas, RDF.type, PROV.Entity))
    graph.add((atlas, RDFS.label, Literal("refusal-atlas run", lang="en")))
    created = store.manifest.get("created_at") or store.manifest.get("finished_at")
    if created:
        graph.add((atlas, DCTERMS.created, Literal(str(created))))
    _add_clusters(graph, store, tax, ns, base, atlas)
    _add_directions(graph, store, tax, ns, base, atlas, methods)
    add_sae_features(graph, store, tax, ns, base, atlas)
    return graph


def _taxonomy_graph(store: AtlasStore, taxonomy: Taxonomy | None) -> tuple[Graph, Taxonomy]:
    """The run's own taxonomy.ttl when present (exactly what the ontology stage wrote), else an export.

    `taxonomy` (the run's Taxonomy object) names the nodes directions may link to; without it the
    taxonomy is read back from taxonomy.ttl.
    """
    known = taxonomy if taxonomy is not None else store.taxonomy
    if store.taxonomy_ttl.is_file() and known is not None:
        return parse_rdf(store.taxonomy_ttl), known
    if taxonomy is None:
        raise AtlasError(f"{store.taxonomy_ttl}: missing; run `refusal-atlas run` (or `ontology export`) first")
    return taxonomy_to_graph(taxonomy, load_conditions(), load_crosswalks()), taxonomy


def _add_clusters(graph: Graph, store: AtlasStore, tax: Taxonomy, ns: str, base: str, atlas: URIRef) -> None:
    score_term = optional_term("mappingScore")
    views = [("cluster/", store.cluster_view.clusters), ("cluster/responses/", store.response_cluster_view.clusters)]
    for prefix, c in ((p, c) for p, clusters in views for c in clusters):
        subject = URIRef(f"{base}{prefix}{quote(c.id, safe='')}")
        graph.add((subject, RDF.type, RA.Cluster))
        graph.add((subject, PROV.wasGeneratedBy, atlas))
        graph.add((subject, DCTERMS.identifier, Literal(c.id)))
        if c.label:
            graph.add((subject, RA.clusterLabel, Literal(c.label)))
        if c.size is not None:
            graph.add((subject, RA.memberCount, Literal(int(c.size), datatype=XSD.integer)))
        for rank, (node, score) in enumerate(c.linked_nodes):
            if node not in tax.nodes:
                continue
            graph.add((subject, RA.mapsToNode, iris.node_iri(ns, node)))
            value = _num(score)
            if rank == 0 and score_term is not None and value is not None:
                graph.add((subject, score_term, value))


def _describe_direction(graph: Graph, node: URIRef, *, model: str, revision: str | None, layer: int, position: str,
                        method: str, digest: str, prompt_count: int | None, metrics: dict[str, float],
                        fallback_iri: URIRef) -> URIRef:
    """One definition of the modelling: the ontology layer's `add_direction`."""
    return add_direction(graph, node=node, model=model, layer=layer, position=position, method=method,
                         artefact_file=DIRECTIONS_FILE, sha256=digest, prompt_count=prompt_count,
                         model_revision=revision, metrics=metrics)


def _add_directions(graph: Graph, store: AtlasStore, tax: Taxonomy, ns: str, base: str, atlas: URIRef,
                    methods: tuple[str, ...]) -> None:
    ds = store.directions
    if ds is None:
        return
    digest = file_sha256(store.root / DIRECTIONS_FILE)
    model, revision = model_identity(ds.meta, store.manifest)
    counts = ds.meta.get("n_prompts") or {}
    by_key: dict[tuple[str, int, str], dict[str, Any]] = {}
    if store.direction_metrics is not None:
        for row in store.direction_metrics.to_dict("records"):
            by_key[(row["node"], int(row["layer"]), str(row["position"]))] = row
    norm_term, rel_term = optional_term("norm"), optional_term("reliability")
    columns = {"noise_floor": "noise_floor", "split_half_cosine": "noise_floor", "auroc": "auroc",
               "bypass_score": "bypass_score", "induce_score": "induce_score", "kl_divergence": "kl_score"}
    for method in methods:
        for node in ds.nodes:
            if tax is None or node not in tax.nodes:
                continue
            for pos in ds.positions:
                label = position_label(pos)
                key = f"{method}/{node}/{label}"
                tensor = ds.tensors.get(key)
                if tensor is None:
                    continue
                norms = tensor.norm(dim=-1)
                for j, layer in enumerate(ds.layers):
                    row = by_key.get((node, int(layer), label), {}) if method == "diff_means" else {}
                    metrics = {name: value for name, col in columns.items()
                               if (value := _finite(row.get(col))) is not None}
                    fallback = URIRef(f"{base}direction/{quote(method, safe='')}/{quote(node, safe='')}/"
                                      f"{quote(label, safe='')}/{int(layer)}")
                    subject = _describe_direction(
                        graph, iris.node_iri(ns, node), model=model, revision=revision, layer=int(layer),
                        position=label, method=method, digest=digest,
                        prompt_count=int(counts[node]) if node in counts else None, metrics=metrics,
                        fallback_iri=fallback)
                    graph.add((subject, RDFS.label, Literal(f"{node} {method} layer {layer} position {label}")))
                    graph.add((subject, DCTERMS.identifier, Literal(key)))  # tensor key in the artefact
                    graph.add((subject, PROV.wasGeneratedBy, atlas))
                    norm, reliability = _num(float(norms[j])), _num(row.get("reliability"))
                    if norm_term is not None and norm is not None:
                        graph.add((subject, norm_term, norm))
                    if rel_term is not None and reliability is not None:
                        graph.add((subject, rel_term, reliability))


def validate_atlas_graph(graph: Graph) -> list[str]:
    """SHACL (data/ontology/shapes.ttl) plus the structural checks; [] when the graph conforms."""
    return validate_graph(graph)


def write_atlas_ttl(out_dir: str | Path, *, taxonomy: Taxonomy | None = None,
                    methods: tuple[str, ...] = DEFAULT_METHODS, validate: bool = True) -> Path:
    """Build, validate (SHACL) and write `<out>/atlas.ttl` atomically; a violation is an AtlasError."""
    store = AtlasStore.open(out_dir)
    graph = build_atlas_graph(store, taxonomy=taxonomy, methods=methods)
    if validate:
        problems = validate_atlas_graph(graph)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
            raise AtlasError(f"{store.atlas_ttl}: the atlas graph violates the SHACL shapes: {shown}")
    return write_graph(graph, store.atlas_ttl, "turtle")
