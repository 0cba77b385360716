"""The canned SPARQL queries agree with the Python taxonomy API, on the default and random taxonomies."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rdflib import Graph

from ontology_strategies import SMALL_VOCAB, taxonomies
from refusal_atlas.errors import AtlasError
from refusal_atlas.ontology import queries
from refusal_atlas.ontology.export import build_graph
from refusal_atlas.ontology.sparql import QueryTable, prefixes, run_query
from refusal_atlas.ontology.to_rdf import taxonomy_to_graph
from refusal_atlas.taxonomy.crosswalk import load_crosswalks, nodes_for_external
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy
from refusal_atlas.taxonomy.resolve import contextual_nodes, effective_rules, format_when


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph()


@pytest.fixture(scope="module")
def tax(shipped_taxonomy: Taxonomy) -> Taxonomy:
    return shipped_taxonomy


def column(table: QueryTable, name: str) -> list[str]:
    return [str(record[name]) for record in table.records()]


def rule_rows(table: QueryTable) -> list[tuple]:
    return [(r["source"], r["rule"], ",".join(sorted(r["when"].split(","))), r["expect"]) for r in table.records()]


def expected_rule_rows(taxonomy: Taxonomy, node_id: str) -> list[tuple]:
    rows = []
    for source, rule in effective_rules(taxonomy, node_id):
        index = taxonomy.nodes[source].conditions.index(rule) + 1
        rows.append((source, index, ",".join(sorted(format_when(rule.when).split(","))), rule.expect.value))
    return rows


def test_descendants_match_python(graph: Graph, tax: Taxonomy) -> None:
    for root in tax.roots():
        assert sorted(column(queries.descendants(graph, root.id), "id")) == sorted(tax.descendants(root.id))


def test_conditions_match_effective_rules(graph: Graph, tax: Taxonomy) -> None:
    for node_id in ["weapons.explosives.synthesis", "cyber.malware.ransomware", *[n.id for n in tax.leaves()][:10]]:
        table = queries.conditions(graph, node_id)
        assert sorted(rule_rows(table)) == sorted(expected_rule_rows(tax, node_id)), node_id
        own = [r for r in table.records() if r["from"] == "own"]
        assert table.records()[: len(own)] == own  # own rules are listed first


def test_contextual_matches_python(graph: Graph, tax: Taxonomy) -> None:
    table = queries.contextual(graph)
    assert sorted(column(table, "id")) == sorted(contextual_nodes(tax))
    assert set(column(table, "default")) <= {"refuse", "redirect", "comply_with_caveats", "comply"}


@pytest.mark.parametrize("curie", ["llamaguard3:S9", "harmbench:cybercrime_intrusion", "ailuminate:spc_hlt"])
def test_mapped_to_matches_crosswalks(graph: Graph, curie: str) -> None:
    expected = sorted(set(nodes_for_external(load_crosswalks(), curie)))
    assert expected, curie
    assert sorted(set(column(queries.mapped_to(graph, curie), "id"))) == expected


def test_mapped_to_accepts_full_iri(graph: Graph) -> None:
    from refusal_atlas.taxonomy.crosswalk import external_iri

    by_iri = queries.mapped_to(graph, external_iri("llamaguard3:S9"))
    assert column(by_iri, "id") == column(queries.mapped_to(graph, "llamaguard3:S9"), "id")


def test_unknown_ids_are_clear_errors(graph: Graph) -> None:
    with pytest.raises(AtlasError, match=r"unknown node id 'weapons\.explosive'.*did you mean"):
        queries.conditions(graph, "weapons.explosive")
    with pytest.raises(AtlasError, match="no crosswalk maps to"):
        queries.mapped_to(graph, "harmbench:nonsense")


def test_prefixes_are_prebound(graph: Graph) -> None:
    names = prefixes()
    for prefix in ("ra", "rac", "tax", "skos", "airo", "dpv", "risk", "loc", "dct", "llamaguard3", "harmbench"):
        assert prefix in names
    table = run_query(graph, "SELECT (COUNT(?n) AS ?n_nodes) WHERE { ?n a airo:RiskSource }")
    assert isinstance(table, QueryTable)
    assert table.records()[0]["n_nodes"] == len(load_taxonomy())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(taxonomy=taxonomies(), use_vocab=st.booleans())
def test_random_taxonomies_queries_match_python(taxonomy: Taxonomy, use_vocab: bool) -> None:
    g = taxonomy_to_graph(taxonomy, SMALL_VOCAB if use_vocab else None)
    assert sorted(column(queries.contextual(g), "id")) == sorted(contextual_nodes(taxonomy))
    for node in list(taxonomy)[:2]:
        assert sorted(rule_rows(queries.conditions(g, node.id))) == sorted(expected_rule_rows(taxonomy, node.id))
        assert sorted(column(queries.descendants(g, node.id), "id")) == sorted(taxonomy.descendants(node.id))
