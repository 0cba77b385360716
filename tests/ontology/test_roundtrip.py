"""YAML -> RDF -> YAML gives the same taxonomy; RDF -> YAML -> RDF gives an isomorphic graph.

Checked on the shipped taxonomy (all four RDF formats, with conditions and crosswalks) and on
200+ random taxonomies from hypothesis: DAGs, condition rules, unicode text, every optional
key present or absent, odd list orders and duplicate examples.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rdflib import Graph
from rdflib.compare import isomorphic

from ontology_strategies import SMALL_VOCAB, taxonomies
from refusal_atlas import paths
from refusal_atlas.ontology.export import build_graph, import_graph
from refusal_atlas.ontology.from_rdf import graph_to_conditions, graph_to_taxonomy, write_taxonomy_yaml
from refusal_atlas.ontology.io import parse_rdf_bytes, serialize
from refusal_atlas.ontology.to_rdf import taxonomy_to_graph
from refusal_atlas.taxonomy.conditions import load_conditions
from refusal_atlas.taxonomy.crosswalk import load_crosswalks
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Behaviour, Node, Taxonomy

FORMATS = ["turtle", "json-ld", "nt", "xml"]
VOCAB = load_conditions()


def dump(tax: Taxonomy) -> dict:
    """What "the same taxonomy" means: every field of scheme and nodes (not where they were read from)."""
    return tax.model_dump(mode="json")


def through(graph: Graph, fmt: str) -> Graph:
    return parse_rdf_bytes(serialize(graph, fmt).encode("utf-8"), fmt, f"<{fmt}>")


@pytest.fixture(scope="module")
def default_tax() -> Taxonomy:
    return load_taxonomy()


@pytest.fixture(scope="module")
def default_graph() -> Graph:
    return build_graph()


# ---------------------------------------------------------------- the shipped taxonomy


@pytest.mark.parametrize("fmt", FORMATS)
def test_default_yaml_rdf_yaml_is_lossless(default_tax: Taxonomy, default_graph: Graph, fmt: str) -> None:
    back = graph_to_taxonomy(through(default_graph, fmt))
    assert dump(back) == dump(default_tax)
    assert len(back) == len(default_tax) >= 40


def test_default_rdf_yaml_rdf_is_isomorphic(default_tax: Taxonomy, default_graph: Graph, tmp_path: Path) -> None:
    out = tmp_path / "taxonomy"
    write_taxonomy_yaml(graph_to_taxonomy(default_graph), out)
    again = load_taxonomy(out, conditions=VOCAB)
    assert dump(again) == dump(default_tax)
    regenerated = taxonomy_to_graph(again, VOCAB, load_crosswalks())
    assert isomorphic(regenerated, default_graph)


def test_default_export_uses_dpv_rules_and_contexts(default_graph: Graph) -> None:
    """Sanity of the modelling itself: minors via dpv:Child, rules typed by behaviour."""
    ask = default_graph.query("""
        PREFIX dpv: <https://w3id.org/dpv#>
        PREFIX ra: <https://w3id.org/refusal-atlas/vocab#>
        ASK { ?rule a dpv:Prohibition ; ra:expectedBehaviour ra:Refuse ; dpv:hasContext dpv:Child . }""")
    assert ask.askAnswer
    minor = default_graph.query("""
        PREFIX skos: <http://www.w3.org/2004/02/skos/core#>
        SELECT ?m WHERE { ?m skos:notation "minor" ; skos:closeMatch <https://w3id.org/dpv#Child> }""")
    assert len(list(minor)) == 1


def test_import_keeps_comments_and_file_split(default_graph: Graph, tmp_path: Path) -> None:
    """Importing over a copy of the shipped YAML changes nothing, byte for byte, comments included."""
    existing = tmp_path / "existing"
    shutil.copytree(paths.default_taxonomy_dir(), existing)
    result = import_graph(default_graph, existing, existing_dir=existing)
    for original in sorted(paths.default_taxonomy_dir().glob("*.yaml")):
        assert (existing / original.name).read_text(encoding="utf-8") == original.read_text(encoding="utf-8")
    assert result.rejects is not None  # the crosswalk mappings are not YAML: they go beside, not lost
    assert result.rejects.name == "existing.rejects.ttl"
    rejected = Graph().parse(result.rejects)
    assert len(rejected) == result.rejected_triples > 0
    assert all("Match" in str(p) or "ExternalCategory" in str(o) or "external" in str(s)
               for s, p, o in rejected)


def test_import_edits_in_place_and_places_new_nodes(default_tax: Taxonomy, tmp_path: Path) -> None:
    existing = tmp_path / "tax"
    shutil.copytree(paths.default_taxonomy_dir(), existing)
    nodes = dict(default_tax.nodes)
    first_file = sorted(existing.glob("0[1-9]-*.yaml"))[0]
    text = first_file.read_text(encoding="utf-8")
    victim = next(nid for nid in nodes if nid.startswith(("cyber.malware",)) and not default_tax.children(nid))
    changed = next(nid for nid in nodes if nid == "cyber.malware")
    nodes.pop(victim)
    nodes[changed] = nodes[changed].model_copy(update={"label": "Malware (renamed)"})
    nodes["cyber.malware.new_child"] = Node(id="cyber.malware.new_child", label="New child", definition="New.",
                                            broader=["cyber.malware"])
    nodes["zz_new_root"] = Node(id="zz_new_root", label="New root", definition="Root.", expect=Behaviour.COMPLY)
    edited = Taxonomy(scheme=default_tax.scheme, nodes=nodes)
    import_graph(taxonomy_to_graph(edited, VOCAB), existing, existing_dir=existing)
    after = first_file.read_text(encoding="utf-8")
    assert "Malware (renamed)" in after and "cyber.malware.new_child" in after
    assert f"id: {victim}\n" not in after
    comments = [line for line in text.splitlines() if line.strip().startswith("#")]
    assert comments and all(c in after for c in comments)
    new_root_files = [p for p in existing.glob("*.yaml") if "zz_new_root" in p.read_text(encoding="utf-8")]
    assert [p.name for p in new_root_files] == [f"{len(list(existing.glob('*.yaml'))) - 1:02d}-zz_new_root.yaml"]
    assert dump(load_taxonomy(existing)) == dump(edited)


def test_import_writes_the_graphs_own_condition_vocabulary(tmp_path: Path) -> None:
    """A taxonomy with its own conditions.yaml survives export + import into an empty folder."""
    fixture = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"
    result = import_graph(build_graph(fixture), tmp_path / "out")
    assert (tmp_path / "out" / "conditions.yaml") in result.written
    assert dump(load_taxonomy(tmp_path / "out")) == dump(load_taxonomy(fixture))
    assert (load_conditions(tmp_path / "out" / "conditions.yaml").model_dump()
            == load_conditions(fixture / "conditions.yaml").model_dump())
    assert result.rejects is None  # nothing in that graph is outside the YAML


def test_write_refuses_non_empty_output_without_existing(tmp_path: Path, default_tax: Taxonomy) -> None:
    from refusal_atlas.errors import AtlasError

    write_taxonomy_yaml(default_tax, tmp_path / "a")
    with pytest.raises(AtlasError, match="already holds taxonomy YAML"):
        write_taxonomy_yaml(default_tax, tmp_path / "a")


# ---------------------------------------------------------------- random taxonomies

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tax=taxonomies(), fmt=st.sampled_from(FORMATS), with_vocab=st.booleans())
def test_random_taxonomies_round_trip(tax: Taxonomy, fmt: str, with_vocab: bool) -> None:
    vocab = SMALL_VOCAB if with_vocab else None
    graph = taxonomy_to_graph(tax, vocab)
    # YAML -> RDF -> YAML (via text in one of the four formats) is the same taxonomy
    parsed = through(graph, fmt)
    back = graph_to_taxonomy(parsed)
    assert dump(back) == dump(tax)
    carried = graph_to_conditions(parsed)  # ... and the same condition vocabulary, when it was exported
    assert (carried.model_dump() == SMALL_VOCAB.model_dump()) if with_vocab else carried is None
    # RDF -> YAML files on disk -> loader -> RDF is isomorphic to the original graph
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tax"
        write_taxonomy_yaml(back, out)
        loaded = load_taxonomy(out, conditions=SMALL_VOCAB)
    assert dump(loaded) == dump(tax)
    assert isomorphic(taxonomy_to_graph(loaded, vocab), graph)
