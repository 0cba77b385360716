"""Validate a refusal-atlas graph: SHACL shapes (data/ontology/shapes.ttl) plus Python checks.

SHACL has no recursion over property paths it can reason about cheaply, so skos:broader
cycles are found here in Python. The result is a sorted list of one-line messages
(`<focus>: <path>: <message>`); an empty list means the graph conforms.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from rdflib import RDF, SKOS, Graph, URIRef
from rdflib.namespace import SH
from rdflib.term import Node as RdfNode

from refusal_atlas import paths
from refusal_atlas.errors import AtlasError
from refusal_atlas.ontology.to_rdf import bind_prefixes
from refusal_atlas.taxonomy.validate import parent_cycles


def shapes_path() -> Path:
    return paths.ontology_dir() / "shapes.ttl"


@lru_cache(maxsize=4)
def _shapes(path: str) -> Graph:
    graph = Graph()
    graph.parse(path, format="turtle")
    return graph


def shapes_graph(path: Path | None = None) -> Graph:
    """The SHACL shapes (parsed once per process)."""
    return _shapes(str(path or shapes_path()))


def validate_graph(graph: Graph, *, shapes: Path | None = None) -> list[str]:
    """Every violation as one line; [] when the graph conforms."""
    import pyshacl  # imported here: it is slow to import and only validation needs it

    conforms, results, _ = pyshacl.validate(
        graph, shacl_graph=shapes_graph(shapes), inference="none", abort_on_first=False,
        allow_warnings=False, meta_shacl=False, advanced=False, do_owl_imports=False,
    )
    if not isinstance(results, Graph):  # pyshacl reports a broken shapes file this way
        raise AtlasError(f"{shapes or shapes_path()}: SHACL shapes could not be used: {results}")
    messages = [] if conforms else _messages(graph, results)
    messages.extend(structure_problems(graph))
    return sorted(set(messages))


def _messages(data: Graph, results: Graph) -> list[str]:
    names = bind_prefixes(Graph())
    for prefix, ns in data.namespaces():
        if prefix and prefix not in dict(names.namespaces()):
            names.bind(prefix, ns)
    out = []
    for result in results.subjects(RDF.type, SH.ValidationResult):
        focus = results.value(result, SH.focusNode)
        path = results.value(result, SH.resultPath)
        message = results.value(result, SH.resultMessage)
        value = results.value(result, SH.value)
        text = str(message) if message is not None else "violates a shape"
        parts = [_short(names, focus)]
        if path is not None:
            parts.append(_short(names, path))
        line = ": ".join([*parts, text])
        if value is not None and value != focus:
            line += f" (value: {_short(names, value)})"
        out.append(line)
    return out


def _short(names: Graph, term: RdfNode | None) -> str:
    if term is None:
        return "?"
    if isinstance(term, URIRef):
        try:
            return names.namespace_manager.normalizeUri(term)
        except Exception:  # an IRI rdflib cannot shorten
            return f"<{term}>"
    return repr(str(term)) if not hasattr(term, "n3") else term.n3()


def structure_problems(graph: Graph) -> list[str]:
    """What SHACL cannot say: a taxonomy at all, one scheme, no skos:broader cycles."""
    problems = []
    schemes = set(graph.subjects(RDF.type, SKOS.ConceptScheme))
    if not schemes and not set(graph.subjects(RDF.type, SKOS.Concept)):
        problems.append("graph: not a taxonomy: no skos:ConceptScheme and no skos:Concept")
    if len(schemes) > 1:
        problems.append(f"graph: {len(schemes)} skos:ConceptSchemes; a taxonomy export holds exactly one")
    names = bind_prefixes(Graph())
    for cycle in broader_cycles(graph):
        problems.append(f"{_short(names, cycle[0])}: skos:broader: cycle "
                        f"{' -> '.join(_short(names, c) for c in cycle)}; a concept cannot be its own ancestor")
    return problems


def broader_cycles(graph: Graph) -> list[list[RdfNode]]:
    """Each distinct skos:broader cycle as [a, b, ..., a], rotated to start at its smallest IRI."""
    parents: dict[RdfNode, list[RdfNode]] = {}
    for child, parent in graph.subject_objects(SKOS.broader):
        parents.setdefault(child, []).append(parent)
    for kids in parents.values():
        kids.sort(key=str)
    found = parent_cycles(sorted(parents, key=str), lambda node: parents.get(node, []), str)
    return [found[k] for k in sorted(found)]
