"""atlas.ttl: taxonomy + clusters + directions, SHACL-valid, vectors never in RDF."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from rdflib import RDF, Graph, Literal, URIRef

from fixtures.atlas.builder import LAYERS, MODEL_ID, NODES, POSITIONS, build_atlas, full_atlas
from refusal_atlas.atlas.links import build_atlas_graph, model_identity, validate_atlas_graph, write_atlas_ttl
from refusal_atlas.errors import AtlasError
from refusal_atlas.ontology.namespaces import RA


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    out = full_atlas(tmp_path_factory.mktemp("atlas") / "atlas-out")
    write_atlas_ttl(out)
    return out


@pytest.fixture(scope="module")
def graph(atlas) -> Graph:
    g = Graph()
    g.parse(atlas / "atlas.ttl", format="turtle")
    return g


def test_atlas_ttl_conforms_to_the_shapes(graph):
    assert validate_atlas_graph(graph) == []


def test_one_direction_resource_per_node_layer_position(graph):
    directions = set(graph.subjects(RDF.type, RA.RefusalDirection))
    assert len(directions) == len(NODES) * len(LAYERS) * len(POSITIONS)
    nodes = {str(graph.value(graph.value(d, RA.forNode), URIRef("http://www.w3.org/2004/02/skos/core#notation")))
             for d in directions}
    assert nodes == set(NODES)  # the pooled direction has no node and stays out


def test_directions_carry_metadata_file_and_hash_not_vectors(atlas, graph):
    digest = hashlib.sha256((atlas / "directions" / "directions.safetensors").read_bytes()).hexdigest()
    for d in graph.subjects(RDF.type, RA.RefusalDirection):
        assert str(graph.value(d, RA.artefactFile)) == "directions/directions.safetensors"
        assert str(graph.value(d, RA.sha256)) == digest
        assert str(graph.value(d, RA.model)) == MODEL_ID and graph.value(d, RA.method) == Literal("diff_means")
        assert str(graph.value(d, RA.modelRevision)) == "0123abcd"
        assert -1.0 <= float(graph.value(d, RA.noiseFloor)) <= 1.0
        assert 0.0 <= float(graph.value(d, RA.auroc)) <= 1.0
        assert int(graph.value(d, RA.promptCount)) == 12
        assert graph.value(d, RA.bypassScore) is not None and graph.value(d, RA.klDivergence) is not None
    # No literal long enough to hold a vector.
    assert max(len(str(o)) for o in graph.objects() if isinstance(o, Literal)) < 400


def test_clusters_link_to_their_best_nodes(graph):
    clusters = {c for c in graph.subjects(RDF.type, RA.Cluster) if "/responses/" not in str(c)}
    assert len(clusters) == 4
    wordings = set(graph.subjects(RDF.type, RA.Cluster)) - clusters
    assert len(wordings) == 2 and not any(list(graph.objects(c, RA.mapsToNode)) for c in wordings)
    mapped = {str(graph.value(c, URIRef("http://purl.org/dc/terms/identifier"))): sorted(
        str(n).rsplit("/", 1)[-1] for n in graph.objects(c, RA.mapsToNode)) for c in clusters}
    assert mapped["0"] == ["weapons.cbrn", "weapons.explosives"]
    assert mapped["2"] == [] and mapped["-1"] == []  # fits no node / outliers


def test_taxonomy_and_crosswalks_are_kept(graph):
    from refusal_atlas.ontology.from_rdf import graph_to_taxonomy

    tax = graph_to_taxonomy(graph)
    assert "health.dosing" in tax.nodes and tax.nodes["health.dosing"].conditions
    ext = URIRef("https://w3id.org/refusal-atlas/external/llamaguard3/S9")
    assert (ext, RDF.type, RA.ExternalCategory) in graph


def test_a_broken_direction_is_reported_by_shacl(graph):
    bad = Graph()
    for triple in graph:
        bad.add(triple)
    direction = next(iter(bad.subjects(RDF.type, RA.RefusalDirection)))
    bad.remove((direction, RA.forNode, None))
    problems = validate_atlas_graph(bad)
    assert any("ra:forNode" in p for p in problems)


def test_missing_taxonomy_is_a_clear_error(tmp_path):
    out = build_atlas(tmp_path / "no-tax", stages=("metrics",))
    with pytest.raises(AtlasError, match="refusal-atlas run"):
        build_atlas_graph(out)


def test_taxonomy_only_atlas_is_valid(tmp_path):
    out = build_atlas(tmp_path / "tax-only", stages=("taxonomy",))
    path = write_atlas_ttl(out)
    g = Graph().parse(path, format="turtle")
    assert not set(g.subjects(RDF.type, RA.RefusalDirection))
    assert validate_atlas_graph(g) == []


def test_model_identity_reads_flat_keys_and_provenance():
    assert model_identity({"model_id": "a", "model_revision": "r"}, {}) == ("a", "r")
    assert model_identity({"model": {"model_spec": "default", "model_id": "smol", "model_revision": "h"}}, {}) == (
        "smol", "h")
    assert model_identity({}, {"model": "m"}) == ("m", None)
