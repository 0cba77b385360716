# ruff: noqa: UP031  (SPARQL is full of braces: %-formatting keeps the queries readable)
"""Canned SPARQL queries for the questions researchers ask daily.

Each is plain SPARQL over an exported graph (so the same questions work in any triple store;
the query texts are public constants), with node ids and CURIEs bound as literals, never
pasted into the query text.
"""

from __future__ import annotations

import difflib

from rdflib import SKOS, Graph, Literal, URIRef

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import brief
from refusal_atlas.ontology.namespaces import RA
from refusal_atlas.ontology.sparql import QueryTable, run_query


def _rank(var: str) -> str:
    """SPARQL expression: restrictiveness of the behaviour IRI in ?var (refuse 3 ... comply 0; other -1)."""
    return (f"IF(?{var} = ra:Refuse, 3, IF(?{var} = ra:Redirect, 2, "
            f"IF(?{var} = ra:ComplyWithCaveats, 1, IF(?{var} = ra:Comply, 0, -1))))")


def _name(var: str) -> str:
    """SPARQL expression: the YAML name of the behaviour IRI in ?var."""
    return (f'IF(?{var} = ra:Refuse, "refuse", IF(?{var} = ra:Redirect, "redirect", '
            f'IF(?{var} = ra:ComplyWithCaveats, "comply_with_caveats", IF(?{var} = ra:Comply, "comply", '
            f'STR(?{var})))))')


def _rank_name(var: str) -> str:
    """SPARQL expression: the behaviour name for the restrictiveness number in ?var."""
    return (f'IF(?{var} = 3, "refuse", IF(?{var} = 2, "redirect", '
            f'IF(?{var} = 1, "comply_with_caveats", "comply")))')


_CONTEXT_PAIR = """
        ?rule dpv:hasContext ?ctx .
        OPTIONAL { ?ctx ra:dimension ?ownDim ; skos:notation ?ownValue }
        OPTIONAL { ?valueNode skos:closeMatch ?ctx ; a ra:ContextValue ; ra:dimension ?matchDim ;
                   skos:notation ?matchValue }
        BIND(COALESCE(?ownDim, ?matchDim) AS ?dimNode)
        BIND(COALESCE(?ownValue, ?matchValue) AS ?value)
        ?dimNode skos:notation ?dim .
        BIND(CONCAT(STR(?dim), "=", STR(?value)) AS ?pair)"""

DESCENDANTS = """
SELECT ?id ?label ?expect WHERE {
    ?root skos:notation ?root_id ;
          skos:inScheme ?scheme .
    ?node skos:broader+ ?root ;
          skos:notation ?id ;
          skos:prefLabel ?label .
    FILTER(LANGMATCHES(LANG(?label), "en") || LANG(?label) = "")
    OPTIONAL { ?node ra:expectedBehaviour ?own }
    BIND(IF(BOUND(?own), %s, "(inherited)") AS ?expect)
}
ORDER BY ?id
""" % _name("own")

CONDITIONS = """
SELECT ?source ?from ?rule (GROUP_CONCAT(?pair; separator=",") AS ?when) ?expect ?rationale WHERE {
    ?node skos:notation ?node_id ;
          skos:inScheme ?scheme ;
          skos:broader* ?src .
    ?src skos:notation ?source ;
         dpv:hasRule ?ruleNode .
    ?ruleNode ra:expectedBehaviour ?behaviour .
    OPTIONAL { ?ruleNode ra:ruleIndex ?index }
    OPTIONAL { ?ruleNode ra:rationale ?rationale }
    %s
    BIND(COALESCE(?index, 0) AS ?rule)
    BIND(%s AS ?expect)
    BIND(IF(?src = ?node, "own", "inherited") AS ?from)
}
GROUP BY ?from ?source ?ruleNode ?rule ?expect ?rationale
ORDER BY DESC(?from) ?source ?rule ?ruleNode
""" % (_CONTEXT_PAIR.replace("?rule ", "?ruleNode "), _name("behaviour"))

MAPPED_TO = """
SELECT ?id ?label ?match ?category WHERE {
    VALUES ?predicate { skos:exactMatch skos:closeMatch skos:broadMatch skos:narrowMatch skos:relatedMatch }
    ?node ?predicate ?external ;
          skos:notation ?id ;
          skos:prefLabel ?label .
    FILTER(LANGMATCHES(LANG(?label), "en") || LANG(?label) = "")
    OPTIONAL { ?external skos:notation ?notation }
    FILTER(?external = ?target || STR(?notation) = ?curie)
    BIND(STRAFTER(STR(?predicate), "#") AS ?match)
    BIND(COALESCE(?notation, STR(?external)) AS ?category)
}
ORDER BY ?id ?match
"""

# contextual() runs in steps: CONSTRUCT helper edges (in a private urn: namespace, into a
# scratch copy of the graph), then one SELECT. One big query with nested property paths and
# NOT EXISTS is correct too, but ten times slower in rdflib.

_INHERITANCE_EDGES = """
CONSTRUCT { ?child <urn:refusal-atlas:query:inheritsDefaultFrom> ?parent }
WHERE {
    ?child a skos:Concept ;
           skos:broader ?parent .
    FILTER NOT EXISTS { ?child ra:expectedBehaviour ?own }
}
"""

_APPLIES_EDGES = """
CONSTRUCT { ?node <urn:refusal-atlas:query:appliesRule> ?rule }
WHERE {
    ?node a skos:Concept ;
          skos:broader* ?src .
    ?src dpv:hasRule ?rule .
}
"""

_SAME_CONTEXT_EDGES = """
CONSTRUCT { ?rule <urn:refusal-atlas:query:sameContextsAs> ?other }
WHERE {
    ?node <urn:refusal-atlas:query:appliesRule> ?rule , ?other .
    FILTER(?rule != ?other)
    FILTER NOT EXISTS { ?other dpv:hasContext ?x . FILTER NOT EXISTS { ?rule dpv:hasContext ?x } }
    FILTER NOT EXISTS { ?rule dpv:hasContext ?y . FILTER NOT EXISTS { ?other dpv:hasContext ?y } }
}
"""

_DEFAULT_RANKS = """
CONSTRUCT { ?node <urn:refusal-atlas:query:defaultRank> ?defaultRank }
WHERE {
    {
        SELECT ?node (MAX(%s) AS ?defaultRank) WHERE {
            ?node a skos:Concept ;
                  <urn:refusal-atlas:query:inheritsDefaultFrom>* ?giver .
            ?giver ra:expectedBehaviour ?given .
        } GROUP BY ?node
    }
}
""" % _rank("given")

CONTEXTUAL = """
SELECT ?id ?label ?default (GROUP_CONCAT(DISTINCT ?changedName; separator=",") AS ?changes_to)
       (COUNT(DISTINCT ?rule) AS ?rules)
WHERE {
    ?node <urn:refusal-atlas:query:defaultRank> ?defaultRank ;
          <urn:refusal-atlas:query:appliesRule> ?rule ;
          skos:notation ?id ;
          skos:prefLabel ?label .
    ?rule ra:expectedBehaviour ?changed .
    BIND(%s AS ?changedRank)
    BIND(%s AS ?changedName)
    BIND(%s AS ?default)
    FILTER(?changedRank != ?defaultRank)
    FILTER(LANGMATCHES(LANG(?label), "en") || LANG(?label) = "")
    FILTER NOT EXISTS { ?node ra:status ra:Deprecated }
    # a rule with exactly the same contexts and a more restrictive behaviour decides that context
    FILTER NOT EXISTS {
        ?rule <urn:refusal-atlas:query:sameContextsAs> ?rule2 .
        ?node <urn:refusal-atlas:query:appliesRule> ?rule2 .
        ?rule2 ra:expectedBehaviour ?other .
        FILTER(%s > ?changedRank)
    }
}
GROUP BY ?id ?label ?default
ORDER BY ?id
""" % (_rank("changed"), _name("changed"), _rank_name("defaultRank"), _rank("other"))


def _require_node(graph: Graph, node_id: str) -> None:
    ids = {str(o) for s, o in graph.subject_objects(SKOS.notation) if (s, SKOS.inScheme, None) in graph}
    if node_id not in ids:
        close = difflib.get_close_matches(node_id, sorted(ids), n=1, cutoff=0.6)
        hint = f" (did you mean {brief(close[0])}?)" if close else ""
        raise AtlasError(f"unknown node id {brief(node_id)}{hint}; `refusal-atlas taxonomy show` lists the ids")


def descendants(graph: Graph, node_id: str) -> QueryTable:
    """Every node below `node_id` (through all parents of a DAG), with its own expected behaviour."""
    _require_node(graph, node_id)
    return _table(run_query(graph, DESCENDANTS, {"root_id": Literal(node_id)}))


def conditions(graph: Graph, node_id: str) -> QueryTable:
    """Every condition rule that applies to `node_id`: its own first, then inherited, with the source node."""
    _require_node(graph, node_id)
    table = _table(run_query(graph, CONDITIONS, {"node_id": Literal(node_id)}))
    col = table.columns.index("when")
    for row in table.rows:  # GROUP_CONCAT order is unspecified: sort the dim=value pairs
        row[col] = Literal(",".join(sorted(str(row[col]).split(","))))
    return table


def mapped_to(graph: Graph, external: str) -> QueryTable:
    """Our nodes mapped to an external category, given as CURIE (`llamaguard3:S9`) or full IRI."""
    target = URIRef(external) if external.startswith(("http://", "https://")) else URIRef("urn:refusal-atlas:none")
    known = {str(o) for s in graph.subjects(None, RA.ExternalCategory) for o in graph.objects(s, SKOS.notation)}
    iris = {str(s) for s in graph.subjects(None, RA.ExternalCategory)}
    if external not in known and external not in iris:
        close = difflib.get_close_matches(external, sorted(known), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        prefixes = sorted({k.split(":", 1)[0] for k in known})
        raise AtlasError(f"no crosswalk maps to {brief(external)}{hint} (known prefixes: "
                         f"{', '.join(prefixes) or 'none: export with crosswalks'})")
    return _table(run_query(graph, MAPPED_TO, {"target": target, "curie": Literal(external)}))


def contextual(graph: Graph) -> QueryTable:
    """Nodes (not deprecated) whose expected behaviour changes under some condition rule's context.

    Agrees with `refusal_atlas.taxonomy.resolve.contextual_nodes`: a rule counts when the behaviour
    its own context resolves to (the most restrictive of the rules with exactly that context)
    differs from the node's default (own `expect`, else the most restrictive inherited one).
    """
    work = Graph()
    for prefix, ns in graph.namespaces():
        work.bind(prefix, ns)
    work += graph
    for step in (_INHERITANCE_EDGES, _DEFAULT_RANKS, _APPLIES_EDGES, _SAME_CONTEXT_EDGES):
        edges = run_query(work, step)
        assert isinstance(edges, Graph)
        work += edges
    return _table(run_query(work, CONTEXTUAL))


def _table(result: QueryTable | Graph) -> QueryTable:
    assert isinstance(result, QueryTable)
    return result
