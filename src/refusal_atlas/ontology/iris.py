"""How taxonomy objects are named in RDF: one place, so export, import and queries agree.

- node `weapons.explosives` -> `<namespace>weapons.explosives` (namespace from the scheme)
- its N-th condition rule (1-based, file order) -> `<node IRI>/rule/N` (no blank nodes, so two
  exports of the same taxonomy are isomorphic triple for triple)
- the scheme -> the namespace without its trailing `/` or `#`
- condition dimension `user_age` -> `rac:user_age`; value `minor` -> `rac:user_age/minor`
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from rdflib import URIRef

from refusal_atlas.ontology.namespaces import CONDITION_IRI, RA
from refusal_atlas.taxonomy.model import Behaviour, Status

BEHAVIOUR_IRI: dict[Behaviour, URIRef] = {
    Behaviour.REFUSE: RA.Refuse,
    Behaviour.REDIRECT: RA.Redirect,
    Behaviour.COMPLY_WITH_CAVEATS: RA.ComplyWithCaveats,
    Behaviour.COMPLY: RA.Comply,
}
IRI_BEHAVIOUR: dict[URIRef, Behaviour] = {v: k for k, v in BEHAVIOUR_IRI.items()}

STATUS_IRI: dict[Status, URIRef] = {
    Status.PROPOSED: RA.Proposed,
    Status.ACCEPTED: RA.Accepted,
    Status.DEPRECATED: RA.Deprecated,
}
IRI_STATUS: dict[URIRef, Status] = {v: k for k, v in STATUS_IRI.items()}


def scheme_iri(namespace: str) -> URIRef:
    """The ConceptScheme's IRI: the namespace minus a trailing '/' or '#' (or namespace + '#scheme')."""
    trimmed = namespace.rstrip("/#")
    return URIRef(trimmed if trimmed and trimmed != namespace else namespace + "#scheme")


def node_iri(namespace: str, node_id: str) -> URIRef:
    return URIRef(namespace + node_id)


def rule_iri(namespace: str, node_id: str, index: int) -> URIRef:
    """Rules are numbered from 1 in file order."""
    return URIRef(f"{namespace}{node_id}/rule/{index}")


def dimension_iri(dimension: str) -> URIRef:
    return URIRef(CONDITION_IRI + quote(dimension, safe=""))


def value_iri(dimension: str, value: str) -> URIRef:
    return URIRef(f"{CONDITION_IRI}{quote(dimension, safe='')}/{quote(value, safe='')}")


def parse_value_iri(iri: str) -> tuple[str, str] | None:
    """(dimension, value) from a minted value IRI, or None when the IRI is not one."""
    if not iri.startswith(CONDITION_IRI):
        return None
    rest = iri[len(CONDITION_IRI):]
    dim, sep, value = rest.partition("/")
    if not sep or not dim or not value or "/" in value:
        return None
    return unquote(dim), unquote(value)
