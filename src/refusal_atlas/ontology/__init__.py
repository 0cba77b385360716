"""refusal_atlas.ontology: the taxonomy as RDF (SKOS + AIRO + DPV), SHACL validation, SPARQL.

The main entry points, importable in a notebook::

    from refusal_atlas.ontology import build_graph, graph_to_taxonomy, validate_graph, run_query
    g = build_graph()                      # shipped taxonomy + conditions + crosswalks
    run_query(g, "SELECT ?n WHERE { ?n a risk:PotentialRiskSource }").records()
"""

from refusal_atlas.ontology.export import build_graph, import_graph
from refusal_atlas.ontology.from_rdf import graph_to_taxonomy, write_taxonomy_yaml
from refusal_atlas.ontology.io import parse_rdf, serialize, write_graph
from refusal_atlas.ontology.shacl import validate_graph
from refusal_atlas.ontology.sparql import QueryTable, run_query
from refusal_atlas.ontology.to_rdf import taxonomy_to_graph

__all__ = [
    "QueryTable",
    "build_graph",
    "graph_to_taxonomy",
    "import_graph",
    "parse_rdf",
    "run_query",
    "serialize",
    "taxonomy_to_graph",
    "validate_graph",
    "write_graph",
    "write_taxonomy_yaml",
]
