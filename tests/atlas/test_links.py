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

SKOS_NOTATION = URIRef("http://www.w3.org/2004/02/skos/core#notation")


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
    branch = {d for d in directions if str(graph.value(d, RA.directionSet)) == "branches"}
    tree = {d for d in directions if str(graph.value(d, RA.directionSet)) == "tree"}
    assert len(branch) == len(NODES) * len(LAYERS) * len(POSITIONS)
    assert len(tree) == 3 * len(LAYERS) * len(POSITIONS)  # the fixture's three roots, from their leaves' prompts
    assert branch | tree == directions  # no pooled direction: the fixture's selection scores node directions

    def nodes(ds):
        return {str(graph.value(graph.value(d, RA.forNode), SKOS_NOTATION)) for d in ds}

    assert nodes(branch) == set(NODES) and nodes(tree) == {"cyber", "health", "weapons"}


def test_directions_carry_metadata_file_and_hash_not_vectors(atlas, graph):
    digest = hashlib.sha256((atlas / "directions" / "directions.safetensors").read_bytes()).hexdigest()
    for d in graph.subjects(RDF.type, RA.RefusalDirection):
        if str(graph.value(d, RA.directionSet)) == "tree":
            assert str(graph.value(d, RA.artefactFile)) == "directions/tree/directions.safetensors"
            continue
        assert str(graph.value(d, RA.artefactFile)) == "directions/directions.safetensors"
        assert str(graph.value(d, RA.sha256)) == digest
        assert str(graph.value(d, RA.model)) == MODEL_ID and graph.value(d, RA.method) == Literal("diff_means")
        assert str(graph.value(d, RA.modelRevision)) == "0123abcd"
        assert -1.0 <= float(graph.value(d, RA.noiseFloor)) <= 1.0
        assert 0.0 <= float(graph.value(d, RA.auroc)) <= 1.0
        assert int(graph.value(d, RA.promptCount)) == 12
        assert 0.0 <= float(graph.value(d, RA.reliability)) <= 1.0 and float(graph.value(d, RA.norm)) > 0
        assert str(graph.value(d, RA.directionSet)) == "branches"
    # No literal long enough to hold a vector.
    assert max(len(str(o)) for o in graph.objects() if isinstance(o, Literal)) < 400


def test_selection_scores_and_the_selected_direction_are_in_the_graph(atlas, graph):
    import pandas as pd

    sel = pd.read_parquet(atlas / "causal" / "selection.parquet")
    candidates = list(graph.subjects(RDF.type, RA.SelectionCandidate))
    assert len(candidates) == len(sel)
    for c in candidates:
        d = graph.value(c, RA.candidateDirection)
        assert (d, RDF.type, RA.RefusalDirection) in graph  # the candidate scores a described direction
        assert graph.value(c, RA.layer) == graph.value(d, RA.layer)
        node = str(graph.value(graph.value(d, RA.forNode), SKOS_NOTATION))
        row = sel[(sel["layer"] == int(graph.value(c, RA.layer)))
                  & (sel["position"] == str(graph.value(c, RA.position))) & (sel["node"] == node)].iloc[0]
        assert float(graph.value(c, RA.bypassScore)) == pytest.approx(row["bypass_score"])
        assert float(graph.value(c, RA.induceScore)) == pytest.approx(row["induce_score"])
        assert float(graph.value(c, RA.klDivergence)) == pytest.approx(row["kl"])
        assert graph.value(c, RA.selected).toPython() == bool(row["chosen"])
    run = next(graph.subjects(RA.selectedDirection, None))
    chosen = set(graph.objects(run, RA.selectedDirection))
    assert len(chosen) == int(sel["chosen"].sum()) and {int(graph.value(d, RA.layer)) for d in chosen} == {2}


def test_overlap_edges_and_findings_are_in_the_graph(atlas, graph):
    import networkx as nx

    g = nx.read_graphml(atlas / "overlap" / "overlap.graphml")
    edges = [(a, b, d) for a, b, d in g.edges(data=True) if d.get("kind") == "overlap"]
    found = list(graph.subjects(RDF.type, RA.OverlapEdge))
    assert edges and len(found) == len(edges)
    for e in found:
        low, cos, high = (float(graph.value(e, p)) for p in (RA.ciLow, RA.cosine, RA.ciHigh))
        assert low <= high and -1 <= cos <= 1
        assert float(graph.value(e, RA.correctedCiLow)) > 0  # the edge rule
        assert graph.value(e, RA.sourceFloor) is not None and graph.value(e, RA.targetFloor) is not None
        assert int(graph.value(e, RA.layer)) == int(g.graph["layer"])


def test_the_model_is_never_an_absolute_path(tmp_path):
    from refusal_atlas.atlas.links import portable_model

    root = tmp_path / "atlas-out"
    assert portable_model(str(root / "organism" / "model"), root) == "organism/model"
    assert portable_model("/home/someone/models/smol", root) == "models/smol"
    assert portable_model("HuggingFaceTB/SmolLM2-135M-Instruct", root) == "HuggingFaceTB/SmolLM2-135M-Instruct"


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
