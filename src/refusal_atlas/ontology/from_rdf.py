"""RDF -> Taxonomy: the inverse of `to_rdf`, tolerant of graphs edited in other tools.

A graph edited in Protégé or a triple store may lose our helper triples (notations, rule
indexes, order hints); each has a fallback (the IRI, the IRI order, sorted order). What cannot
be recovered (a concept without a label, a rule whose context is unknown) is reported, every
problem at once, naming the IRI, instead of guessing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from pydantic import ValidationError
from rdflib import OWL, RDF, SKOS, Graph, Literal, URIRef
from rdflib.namespace import DCTERMS, VANN
from rdflib.term import Node as RdfNode

from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.io import brief
from refusal_atlas.ontology import iris
from refusal_atlas.ontology.namespaces import DPV, RA
from refusal_atlas.ontology.yaml_layout import write_taxonomy_yaml
from refusal_atlas.taxonomy.conditions import ConditionValue, ConditionVocabulary, Dimension
from refusal_atlas.taxonomy.model import ID_PATTERN, Behaviour, ConditionRule, Node, Scheme, Status, Taxonomy

__all__ = ["graph_to_conditions", "graph_to_taxonomy", "write_taxonomy_yaml"]

_RULE_TYPE_BEHAVIOUR = {DPV.Prohibition: Behaviour.REFUSE, DPV.Permission: Behaviour.COMPLY}


def graph_to_taxonomy(graph: Graph, *, source: str = "graph") -> Taxonomy:
    """Read the one skos:ConceptScheme in `graph` and its concepts back into a Taxonomy.

    Raises AtlasError when the graph is not a taxonomy, ValidationErrors (one line per problem,
    prefixed with `source`) when parts of it cannot be read.
    """
    schemes = sorted(set(graph.subjects(RDF.type, SKOS.ConceptScheme)), key=str)
    if not schemes:
        n_concepts = len(set(graph.subjects(RDF.type, SKOS.Concept)))
        detail = f" ({n_concepts} skos:Concept but no scheme)" if n_concepts else ""
        raise AtlasError(f"{source}: not a taxonomy: no skos:ConceptScheme found{detail}; export one with "
                         "`refusal-atlas ontology export` to see the expected shape")
    if len(schemes) > 1:
        raise AtlasError(f"{source}: {len(schemes)} skos:ConceptSchemes found ({', '.join(map(str, schemes[:3]))}); "
                         "import one taxonomy at a time")
    scheme_node = schemes[0]
    problems: list[str] = []
    concepts = sorted(
        {c for c in graph.subjects(SKOS.inScheme, scheme_node) if isinstance(c, URIRef)}
        | {c for c in graph.subjects(SKOS.topConceptOf, scheme_node) if isinstance(c, URIRef)}
        | {c for c in graph.objects(scheme_node, SKOS.hasTopConcept) if isinstance(c, URIRef)},
        key=str,
    )
    if not concepts:
        raise AtlasError(f"{source}: not a taxonomy: the scheme <{scheme_node}> has no concepts "
                         "(nothing is skos:inScheme it)")
    scheme = _read_scheme(graph, scheme_node, concepts, problems)
    ids = _concept_ids(graph, concepts, scheme.namespace, problems)
    vocab_index = _context_index(graph)
    nodes: dict[str, Node] = {}
    for concept in concepts:
        if concept not in ids:
            continue
        node = _read_node(graph, concept, ids, scheme.namespace, vocab_index, problems)
        if node is not None:
            nodes[node.id] = node
    if problems:
        raise ValidationErrors([f"{source}: {p}" for p in problems])
    return Taxonomy(scheme=scheme, nodes={nid: nodes[nid] for nid in _hierarchy_order(nodes)})


def graph_to_conditions(graph: Graph) -> ConditionVocabulary | None:
    """The condition vocabulary described in `graph` (an export made with one), else None.

    None when any described dimension or value lacks a label or definition: such a graph was
    exported without a vocabulary and only names the values its rules use.
    """
    dimensions: dict[str, Dimension] = {}
    for dim_node in sorted(set(graph.subjects(RDF.type, RA.ConditionDimension)), key=str):
        name = next((str(o) for o in graph.objects(dim_node, SKOS.notation)), None)
        label, definition = _first(graph, dim_node, SKOS.prefLabel), _first(graph, dim_node, SKOS.definition)
        if name is None or label is None or definition is None:
            return None
        values: dict[str, ConditionValue] = {}
        for value_node in sorted(set(graph.subjects(RA.dimension, dim_node)), key=str):
            value = next((str(o) for o in graph.objects(value_node, SKOS.notation)), None)
            vlabel, vdefinition = _first(graph, value_node, SKOS.prefLabel), _first(graph, value_node, SKOS.definition)
            if value is None or vlabel is None or vdefinition is None:
                return None
            dpv = sorted(str(o) for o in graph.objects(value_node, SKOS.closeMatch) if isinstance(o, URIRef))
            values[value] = ConditionValue(label=vlabel, definition=vdefinition, dpv=dpv[0] if dpv else None)
        if values:
            dimensions[name] = Dimension(label=label, definition=definition, values=values)
    return ConditionVocabulary(dimensions=dimensions) if dimensions else None


def _first(graph: Graph, subject: RdfNode, predicate: URIRef) -> str | None:
    values = _text(graph, subject, predicate)
    return values[0] if values else None


def _text(graph: Graph, subject: RdfNode, predicate: URIRef) -> list[str]:
    """Literal values, English first, then untagged, then other languages (each group sorted)."""
    values = [o for o in graph.objects(subject, predicate) if isinstance(o, Literal)]

    def rank(lit: Literal) -> tuple[int, str]:
        lang = (lit.language or "").lower()
        return (0 if lang == "en" else 1 if not lang else 2, str(lit))

    return [str(v) for v in sorted(values, key=rank)]


def _one_text(graph: Graph, subject: RdfNode, predicate: URIRef, what: str, problems: list[str],
              *, required: bool = False) -> str | None:
    values = [o for o in graph.objects(subject, predicate) if isinstance(o, Literal)]
    english = [v for v in values if (v.language or "").lower() == "en"]
    pool = english or [v for v in values if not v.language] or values
    if not pool:
        if required:
            problems.append(f"<{subject}> has no {what}")
        return None
    if len({str(v) for v in pool}) > 1:
        problems.append(f"<{subject}> has {len(pool)} different {what} values; keep one "
                        f"({', '.join(brief(str(v)) for v in sorted(pool, key=str)[:3])})")
    return str(sorted(pool, key=str)[0])


def _read_scheme(graph: Graph, node: RdfNode, concepts: list[URIRef], problems: list[str]) -> Scheme:
    defaults = Scheme()
    namespace = _one_text(graph, node, VANN.preferredNamespaceUri, "vann:preferredNamespaceUri", problems)
    if namespace is None:
        namespace = _guess_namespace(graph, concepts) or defaults.namespace
    licence = [o for o in graph.objects(node, DCTERMS.license)]
    return Scheme(
        id=_one_text(graph, node, DCTERMS.identifier, "dct:identifier", problems) or defaults.id,
        title=_one_text(graph, node, DCTERMS.title, "dct:title", problems) or defaults.title,
        version=_one_text(graph, node, OWL.versionInfo, "owl:versionInfo", problems) or defaults.version,
        namespace=namespace,
        license=str(sorted(licence, key=str)[0]) if licence else None,
        description=_one_text(graph, node, DCTERMS.description, "dct:description", problems),
    )


def _guess_namespace(graph: Graph, concepts: list[URIRef]) -> str | None:
    """Without vann:preferredNamespaceUri: IRI minus notation, when all concepts agree."""
    found = set()
    for concept in concepts:
        notation = next((str(o) for o in graph.objects(concept, SKOS.notation)), None)
        if notation and str(concept).endswith(notation):
            found.add(str(concept)[: -len(notation)])
    return found.pop() if len(found) == 1 else None


def _concept_ids(graph: Graph, concepts: list[URIRef], namespace: str, problems: list[str]) -> dict[URIRef, str]:
    ids: dict[URIRef, str] = {}
    seen: dict[str, URIRef] = {}
    for concept in concepts:
        notations = sorted({str(o) for o in graph.objects(concept, SKOS.notation) if isinstance(o, Literal)})
        if len(notations) > 1:
            problems.append(f"<{concept}> has {len(notations)} skos:notation values ({', '.join(notations)}); "
                            "keep one: it is the node id")
            continue
        if notations:
            node_id = notations[0]
        elif str(concept).startswith(namespace):
            node_id = str(concept)[len(namespace):]
        else:
            problems.append(f"<{concept}> has no skos:notation and is outside the namespace {namespace}; "
                            "add a skos:notation with the node id")
            continue
        if not ID_PATTERN.fullmatch(node_id) or ".." in node_id:
            problems.append(f"<{concept}>: id {brief(node_id)} may contain only a-z, 0-9, '_', '.', '-' "
                            "(no '/' or '..')")
            continue
        if node_id in seen:
            problems.append(f"<{concept}> and <{seen[node_id]}> share the id {brief(node_id)}")
            continue
        seen[node_id] = concept
        ids[concept] = node_id
    return ids


def _context_index(graph: Graph) -> dict[RdfNode, tuple[str, str] | None]:
    """Context term -> (dimension, value): minted values directly, DPV terms via skos:closeMatch.

    A DPV term matched by two values maps to None (ambiguous); `to_rdf` never writes those.
    """
    index: dict[RdfNode, tuple[str, str] | None] = {}
    for value in set(graph.subjects(RDF.type, RA.ContextValue)):
        pair = _value_pair(graph, value)
        if pair is None:
            continue
        index[value] = pair
        for match in set(graph.objects(value, SKOS.closeMatch)) | set(graph.objects(value, SKOS.exactMatch)):
            index[match] = None if match in index and index[match] != pair else pair
    return index


def _value_pair(graph: Graph, value: RdfNode) -> tuple[str, str] | None:
    dim_node = next(iter(sorted(graph.objects(value, RA.dimension), key=str)), None)
    dim = next((str(o) for o in graph.objects(dim_node, SKOS.notation)), None) if dim_node is not None else None
    name = next((str(o) for o in graph.objects(value, SKOS.notation)), None)
    if dim and name:
        return dim, name
    return iris.parse_value_iri(str(value))


def _read_node(graph: Graph, concept: URIRef, ids: dict[URIRef, str], namespace: str,
               vocab_index: dict[RdfNode, tuple[str, str] | None], problems: list[str]) -> Node | None:
    node_id = ids[concept]
    before = len(problems)
    label = _one_text(graph, concept, SKOS.prefLabel, "skos:prefLabel", problems, required=True)
    definition = _one_text(graph, concept, SKOS.definition, "skos:definition", problems, required=True)
    parents = []
    for parent in graph.objects(concept, SKOS.broader):
        if isinstance(parent, URIRef) and parent in ids:
            parents.append(ids[parent])
        elif isinstance(parent, URIRef) and str(parent).startswith(namespace):
            parents.append(str(parent)[len(namespace):])  # unknown parent: reported by taxonomy validation
        else:
            problems.append(f"node {brief(node_id)}: skos:broader <{parent}> is not a concept of this scheme")
    broader = _ordered(parents, _json_list(graph, concept, RA.broaderOrder, problems))
    expect = _behaviour(graph, concept, node_id, problems)
    status = _status(graph, concept, node_id, problems)
    examples = _ordered(_text(graph, concept, SKOS.example), _json_list(graph, concept, RA.exampleOrder, problems))
    kind = _one_text(graph, concept, RA.sourceKind, "ra:sourceKind", problems)
    provenance = _one_text(graph, concept, RA.provenance, "ra:provenance", problems)
    rules = _rules(graph, concept, node_id, vocab_index, problems)
    if len(problems) > before or label is None or definition is None:
        return None
    try:
        return Node(id=node_id, label=label, definition=definition, broader=broader, kind=kind, expect=expect,
                    conditions=rules, examples=examples, status=status, provenance=provenance)
    except ValidationError as exc:
        problems.append(f"node {brief(node_id)}: {exc.errors()[0]['msg']}")
        return None


def _json_list(graph: Graph, subject: RdfNode, predicate: URIRef, problems: list[str]) -> list[str] | None:
    raw = next(iter(graph.objects(subject, predicate)), None)
    if raw is None:
        return None
    try:
        value = json.loads(str(raw))
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"<{subject}>: {graph.namespace_manager.normalizeUri(predicate)} must be a JSON list "
                        "of strings; delete it to fall back to sorted order")
        return None
    return value


def _ordered(items: Iterable[str], hint: list[str] | None) -> list[str]:
    """`items` (an RDF set, as a multiset of values) in the hinted order; items not in the hint sorted after.

    The hint may repeat a value (a YAML list may); entries no longer present are dropped.
    """
    present = sorted(set(items))
    if not hint:
        return present
    out = [v for v in hint if v in present]
    return out + [v for v in present if v not in out]


def _behaviour(graph: Graph, subject: RdfNode, where: str, problems: list[str]) -> Behaviour | None:
    values = set(graph.objects(subject, RA.expectedBehaviour))
    if not values:
        return None
    if len(values) > 1:
        problems.append(f"{where}: {len(values)} ra:expectedBehaviour values; keep one")
        return None
    value = values.pop()
    if value not in iris.IRI_BEHAVIOUR:
        problems.append(f"{where}: ra:expectedBehaviour <{value}> is not one of "
                        f"{', '.join(str(v) for v in iris.IRI_BEHAVIOUR)}")
        return None
    return iris.IRI_BEHAVIOUR[value]  # type: ignore[index]


def _status(graph: Graph, concept: URIRef, node_id: str, problems: list[str]) -> Status:
    values = set(graph.objects(concept, RA.status))
    if len(values) > 1:
        problems.append(f"node {brief(node_id)}: {len(values)} ra:status values; keep one")
        return Status.ACCEPTED
    if values:
        value = values.pop()
        if value not in iris.IRI_STATUS:
            problems.append(f"node {brief(node_id)}: ra:status <{value}> is not one of "
                            f"{', '.join(str(v) for v in iris.IRI_STATUS)}")
            return Status.ACCEPTED
        return iris.IRI_STATUS[value]  # type: ignore[index]
    if any(o.toPython() is True for o in graph.objects(concept, OWL.deprecated) if isinstance(o, Literal)):
        return Status.DEPRECATED
    return Status.ACCEPTED


def _rules(graph: Graph, concept: URIRef, node_id: str, vocab_index: dict[RdfNode, tuple[str, str] | None],
           problems: list[str]) -> list[ConditionRule]:
    found = []
    for rule in set(graph.objects(concept, DPV.hasRule)):
        where = f"node {brief(node_id)} rule <{rule}>"
        index_lit = next((o for o in graph.objects(rule, RA.ruleIndex) if isinstance(o, Literal)), None)
        index = index_lit.toPython() if index_lit is not None else None
        order = (0, index, str(rule)) if isinstance(index, int) else (1, 0, str(rule))
        expect = _behaviour(graph, rule, where, problems)
        if expect is None:
            types = set(graph.objects(rule, RDF.type)) & set(_RULE_TYPE_BEHAVIOUR)
            if len(types) == 1:
                expect = _RULE_TYPE_BEHAVIOUR[types.pop()]  # type: ignore[index]
            else:
                problems.append(f"{where}: no ra:expectedBehaviour (a dpv:Obligation alone does not say whether "
                                "to add caveats or redirect)")
                continue
        when: dict[str, str] = {}
        contexts = sorted(graph.objects(rule, DPV.hasContext), key=str)
        if not contexts:
            problems.append(f"{where}: no dpv:hasContext; a rule needs at least one condition")
            continue
        ok = True
        for ctx in contexts:
            pair = vocab_index.get(ctx) if ctx in vocab_index else iris.parse_value_iri(str(ctx))
            if pair is None:
                problems.append(f"{where}: context <{ctx}> is not a known condition value (describe it as an "
                                "ra:ContextValue with ra:dimension and skos:notation, or use a rac: value IRI)")
                ok = False
                continue
            dim, value = pair
            if dim in when and when[dim] != value:
                problems.append(f"{where}: two values for dimension {brief(dim)} ({brief(when[dim])}, {brief(value)})")
                ok = False
            when[dim] = value
        if not ok:
            continue
        rationale = _one_text(graph, rule, RA.rationale, "ra:rationale", problems)
        found.append((order, ConditionRule(when=dict(sorted(when.items())), expect=expect, rationale=rationale)))
    return [rule for _, rule in sorted(found, key=lambda item: item[0])]


def _hierarchy_order(nodes: dict[str, Node]) -> list[str]:
    """Depth-first from the roots, children by id: a readable file order for new YAML."""
    children: dict[str, list[str]] = {}
    for node in nodes.values():
        for parent in node.broader:
            children.setdefault(parent, []).append(node.id)
    order: list[str] = []
    seen: set[str] = set()
    stack = sorted((n.id for n in nodes.values() if not any(p in nodes for p in n.broader)), reverse=True)
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        order.append(nid)
        stack.extend(sorted(children.get(nid, []), reverse=True))
    order.extend(sorted(set(nodes) - seen))  # cycles: validation reports them
    return order
