"""atlas.ttl: the taxonomy graph plus what the run found, linked to the nodes it is about.

- the taxonomy (the run's taxonomy.ttl, or `taxonomy_to_graph` of the given taxonomy) with its
  condition rules and crosswalks;
- every bottom-up cluster as an `ra:Cluster` (`ra:clusterLabel`, `ra:memberCount`) linked to its
  best node(s) by `ra:mapsToNode`;
- every refusal direction of both direction sets (`ra:directionSet` "branches": directions/, causally
  tested; "tree": directions/tree/, every other node with enough prompts) as an `ra:RefusalDirection`
  linked to its node (`ra:forNode`) with the model, layer, token position, method, prompt count,
  noise floor, reliability, norm and AUROC, and the artefact it lives in (`ra:artefactFile`,
  `ra:sha256`; `dct:identifier` is the tensor key inside that file, the row is the index of
  `ra:layer` in directions.json's `layers`). The vectors themselves never go into RDF;
- the pooled direction at every layer the causal selection scored (`ra:PooledRefusalDirection`,
  `ra:pooledOver` its nodes), every `ra:SelectionCandidate` with its bypass, induce and KL scores,
  and the run's `ra:selectedDirection`;
- every edge of the overlap graph (`ra:OverlapEdge`: both nodes, the cosines with their intervals,
  both floors) and every finding of findings.json (`ra:Finding`); see `ontology/results.py`.

Run resources are named under `https://w3id.org/refusal-atlas/atlas/<run id>/`, the run id being
a hash of the direction artefact (or the manifest), so two atlases never share IRIs. The model is
named as `portable_model` writes it: never an absolute path of the machine that ran it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rdflib import RDF, RDFS, XSD, Graph, Literal, URIRef
from rdflib.namespace import DCTERMS, PROV

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.sae_links import add_sae_features
from refusal_atlas.atlas.store import AtlasStore, model_identity
from refusal_atlas.atlas.store_directions import BRANCH_SET, TREE_SET
from refusal_atlas.atlas.store_read import portable_model
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256, text_sha256
from refusal_atlas.lm.positions import position_label
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.mechinterp.tree import TREE_METHOD
from refusal_atlas.ontology import iris
from refusal_atlas.ontology.directions import add_direction, direction_iri
from refusal_atlas.ontology.io import parse_rdf, write_graph
from refusal_atlas.ontology.namespaces import RA
from refusal_atlas.ontology.results import add_finding, add_overlap_edge, add_pooled_direction, add_selection_candidate
from refusal_atlas.ontology.shacl import validate_graph
from refusal_atlas.ontology.to_rdf import taxonomy_to_graph
from refusal_atlas.taxonomy.conditions import load_conditions
from refusal_atlas.taxonomy.crosswalk import load_crosswalks
from refusal_atlas.taxonomy.model import Taxonomy

ATLAS_BASE = "https://w3id.org/refusal-atlas/atlas/"
DIRECTIONS_FILE = f"{schema.DIRECTIONS_DIR}/directions.safetensors"
TREE_FILE = f"{schema.TREE_DIR}/directions.safetensors"
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
    _add_overlap(graph, store, tax, ns, base, atlas)
    _add_findings(graph, store, base, atlas)
    add_sae_features(graph, store, tax, ns, base, atlas)
    _portable_models(graph, store.root)
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


def _add_directions(graph: Graph, store: AtlasStore, tax: Taxonomy, ns: str, base: str, atlas: URIRef,
                    methods: tuple[str, ...]) -> None:
    ds = store.directions
    if ds is None:
        return
    model, revision = model_identity(ds.meta, store.manifest)
    model = portable_model(model, store.root)
    by_key: dict[tuple[str, int, str], dict[str, Any]] = {}
    if store.direction_metrics is not None:
        for row in store.direction_metrics.to_dict("records"):
            by_key[(row["node"], int(row["layer"]), str(row["position"]))] = row
    columns = {"noise_floor": "noise_floor", "split_half_cosine": "noise_floor", "auroc": "auroc",
               "reliability": "reliability"}
    sets: list[tuple[DirectionSet, str, str, tuple[str, ...], set[str]]] = [
        (ds, DIRECTIONS_FILE, BRANCH_SET, methods, set())]
    if store.tree_directions is not None:
        sets.append((store.tree_directions, TREE_FILE, TREE_SET, (TREE_METHOD,), set(ds.nodes)))
    for dset, file, set_name, set_methods, skip in sets:
        digest = file_sha256(store.root / file)
        counts = dset.meta.get("n_prompts") or {}
        # the tree set is described where its floors were estimated (the positions the atlas reads)
        floored = (dset.meta.get("noise") or {}).get("positions") if set_name == TREE_SET else None
        for method in set_methods:
            for node in dset.nodes:
                if node in skip or node not in tax.nodes:
                    continue
                for pos in dset.positions:
                    label = position_label(pos)
                    if floored is not None and label not in floored:
                        continue
                    key = f"{method}/{node}/{label}"
                    tensor = dset.tensors.get(key)
                    if tensor is None:
                        continue
                    norms = tensor.norm(dim=-1)
                    for j, layer in enumerate(dset.layers):
                        row = by_key.get((node, int(layer), label), {}) if method == "diff_means" else {}
                        metrics = {name: value for name, col in columns.items()
                                   if (value := _finite(row.get(col))) is not None}
                        if (norm := _finite(float(norms[j]))) is not None:
                            metrics["norm"] = norm
                        subject = add_direction(
                            graph, node=iris.node_iri(ns, node), model=model, layer=int(layer), position=label,
                            method=method, artefact_file=file, sha256=digest,
                            prompt_count=int(counts[node]) if node in counts else None, model_revision=revision,
                            metrics=metrics, direction_set=set_name)
                        graph.add((subject, RDFS.label, Literal(f"{node} {method} layer {layer} position {label}")))
                        graph.add((subject, DCTERMS.identifier, Literal(key)))  # tensor key in the artefact
                        graph.add((subject, PROV.wasGeneratedBy, atlas))
    _add_selection(graph, store, tax, ns, base, atlas, model)


def _add_selection(graph: Graph, store: AtlasStore, tax: Taxonomy, ns: str, base: str, atlas: URIRef,
                   model: str) -> None:
    """The pooled direction at every layer the selection scored, each candidate, and the chosen one."""
    ds, sel = store.directions, store.selection
    if ds is None or sel is None or sel.empty:
        return
    digest = file_sha256(store.root / DIRECTIONS_FILE)
    nodes = [iris.node_iri(ns, n) for n in ds.nodes if n in tax.nodes]
    pooled: dict[tuple[int, str], URIRef] = {}
    for i, row in enumerate(sel.to_dict("records")):
        layer, pos, node = int(row["layer"]), str(row["position"]), str(row["node"])
        if node != POOLED:  # a node's own candidate scores its own direction resource
            if node not in tax.nodes or node not in ds.nodes:
                continue
            target = direction_iri(iris.node_iri(ns, node), model, layer, pos, str(row.get("method") or "diff_means"))
            candidate = add_selection_candidate(graph, URIRef(f"{base}selection/{i}"), target, row)
            graph.add((candidate, PROV.wasGeneratedBy, atlas))
            if row.get("selected") in (True, 1):
                graph.add((atlas, RA.selectedDirection, target))
            continue
        if (layer, pos) not in pooled:
            subject = URIRef(f"{base}direction/pooled/{quote(pos, safe='')}/{layer}")
            add_pooled_direction(graph, subject, nodes=nodes, model=model, layer=layer, position=pos,
                                 method=str(row.get("method") or "diff_means"), artefact_file=DIRECTIONS_FILE,
                                 sha256=digest)
            graph.add((subject, DCTERMS.identifier, Literal(f"diff_means/{POOLED}/{pos}")))
            graph.add((subject, RDFS.label, Literal(f"pooled direction layer {layer} position {pos}")))
            graph.add((subject, PROV.wasGeneratedBy, atlas))
            pooled[(layer, pos)] = subject
        candidate = add_selection_candidate(graph, URIRef(f"{base}selection/{i}"), pooled[(layer, pos)], row)
        graph.add((candidate, PROV.wasGeneratedBy, atlas))
        if row.get("selected") in (True, 1):
            graph.add((atlas, RA.selectedDirection, pooled[(layer, pos)]))


def _portable_models(graph: Graph, root: Path) -> None:
    """Every `ra:model` of the graph as `portable_model` writes it, whichever builder added it."""
    for subject, value in list(graph.subject_objects(RA.model)):
        portable = portable_model(str(value), root)
        if portable != str(value):
            graph.set((subject, RA.model, Literal(portable)))


def _add_overlap(graph: Graph, store: AtlasStore, tax: Taxonomy, ns: str, base: str, atlas: URIRef) -> None:
    g = store.overlap_graph
    if g is None:
        return
    layer, position = int(g.graph.get("layer", 0)), str(g.graph.get("position", ""))
    method = str(g.graph.get("method", "diff_means"))
    for a, b, data in store.overlap_edges("overlap"):
        if a not in tax.nodes or b not in tax.nodes:
            continue
        subject = URIRef(f"{base}overlap/{quote(a, safe='')}/{quote(b, safe='')}")
        add_overlap_edge(graph, subject, iris.node_iri(ns, a), iris.node_iri(ns, b), data, layer=layer,
                         position=position, method=method)
        graph.add((subject, PROV.wasGeneratedBy, atlas))


def _add_findings(graph: Graph, store: AtlasStore, base: str, atlas: URIRef) -> None:
    findings = (store.findings or {}).get("findings") or []
    for i, finding in enumerate(f for f in findings if isinstance(f, dict)):
        subject = add_finding(graph, URIRef(f"{base}finding/{i}"), finding)
        graph.add((subject, PROV.wasGeneratedBy, atlas))


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
