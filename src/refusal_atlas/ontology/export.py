"""The whole YAML side (taxonomy + condition vocabulary + crosswalks) as one graph, and back.

`build_graph` is what `ontology export` writes and what `ontology sparql` queries by default;
`import_graph` is the reverse used by `ontology import`: it writes the YAML layout and puts
every triple the YAML cannot hold (crosswalk mappings, labels in other languages, notes added
in another tool) into a rejects file beside the output, so nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rdflib import RDF, Graph

from refusal_atlas import paths
from refusal_atlas.errors import ValidationErrors
from refusal_atlas.io import atomic_write_text
from refusal_atlas.ontology.from_rdf import graph_to_conditions, graph_to_taxonomy, write_taxonomy_yaml
from refusal_atlas.ontology.io import write_graph
from refusal_atlas.ontology.namespaces import DPV, RA
from refusal_atlas.ontology.to_rdf import bind_prefixes, taxonomy_to_graph
from refusal_atlas.taxonomy.conditions import ConditionVocabulary
from refusal_atlas.taxonomy.crosswalk import crosswalk_dir_for, load_crosswalks, no_crosswalks_warning
from refusal_atlas.taxonomy.loader import CONDITIONS_FILE, load_taxonomy, vocabulary_for
from refusal_atlas.taxonomy.model import Taxonomy
from refusal_atlas.taxonomy.validate import validate_taxonomy
from refusal_atlas.taxonomy.yamlio import dump_to_text, round_trip_yaml

log = logging.getLogger(__name__)


def build_graph(
    taxonomy_dir: Path | str | None = None,
    *,
    conditions: Path | str | None = None,
    crosswalks: Path | str | None = None,
    with_crosswalks: bool | None = None,
    warn: Callable[[str], None] | None = None,
) -> Graph:
    """Load and export a taxonomy directory (None = the shipped default).

    Crosswalks (unless `with_crosswalks=False`): `crosswalks=DIR`, else the taxonomy's own
    `DIR/crosswalks/`, else the shipped ones for the shipped taxonomy; when there are none, `warn`
    (default: this module's logger, which prints it on stderr when logging is not configured) gets a
    one-line warning, since `mapped-to` on the graph will then find nothing.
    """

    root = Path(taxonomy_dir) if taxonomy_dir is not None else paths.default_taxonomy_dir()
    tax = load_taxonomy(root, conditions=conditions)
    vocab = vocabulary_for(root, conditions)
    folder = crosswalk_dir_for(taxonomy_dir, crosswalks) if with_crosswalks is not False else None
    if folder is None and with_crosswalks is not False:
        (warn or log.warning)(no_crosswalks_warning(root))
    mappings = load_crosswalks(folder) if folder is not None else None
    return taxonomy_to_graph(tax, vocab, mappings)


def default_graph() -> Graph:
    """The shipped taxonomy with its conditions and crosswalks."""
    return build_graph()


@dataclass
class ImportResult:
    taxonomy: Taxonomy
    written: list[Path]
    rejects: Path | None
    rejected_triples: int


def import_graph(
    graph: Graph,
    out_dir: Path | str,
    *,
    existing_dir: Path | str | None = None,
    source: str = "graph",
) -> ImportResult:
    """Write the taxonomy in `graph` as YAML at `out_dir` (see write_taxonomy_yaml for `existing_dir`).

    The taxonomy is validated (parents, cycles, root defaults, condition vocabulary of the target
    directory) before anything is written.
    """
    out = Path(out_dir)
    tax = graph_to_taxonomy(graph, source=source)
    target = Path(existing_dir) if existing_dir is not None else out
    vocab = vocabulary_for(target)
    carried = graph_to_conditions(graph)
    write_vocab = (carried is not None and not (target / CONDITIONS_FILE).is_file()
                   and carried.model_dump() != vocab.model_dump())
    if write_vocab and carried is not None:
        vocab = carried  # the graph's own vocabulary: written beside the taxonomy below
    problems = validate_taxonomy(tax, vocab)
    if problems:
        raise ValidationErrors([f"{source}: {p.message}" for p in problems])
    leftover = unrepresented_triples(graph, tax)
    written = write_taxonomy_yaml(tax, out, existing_dir)
    if write_vocab:
        written.append(write_conditions_yaml(vocab, out / CONDITIONS_FILE))
    rejects = None
    if len(leftover):
        rejects = out.parent / f"{out.name}.rejects.ttl"
        write_graph(leftover, rejects, "turtle")
    return ImportResult(tax, written, rejects, len(leftover))


def write_conditions_yaml(vocab: ConditionVocabulary, path: Path) -> Path:
    """The vocabulary in the `data/conditions.yaml` format (atomically)."""
    data = {"dimensions": {
        dim: {"label": d.label, "definition": d.definition, "values": {
            name: {"label": v.label, "definition": v.definition, **({"dpv": v.dpv} if v.dpv else {})}
            for name, v in d.values.items()}}
        for dim, d in vocab.dimensions.items()}}
    yaml = round_trip_yaml()
    yaml.indent(mapping=2, sequence=4, offset=2)
    atomic_write_text(path, "# Condition vocabulary carried by the imported RDF graph.\n" + dump_to_text(yaml, data))
    return path


def unrepresented_triples(graph: Graph, tax: Taxonomy) -> Graph:
    """Triples of `graph` that the YAML taxonomy does not hold.

    Condition-vocabulary descriptions (they live in conditions.yaml) and the rules' context
    triples (read into `when`) count as represented.
    """
    regenerated = taxonomy_to_graph(tax)
    vocabulary = set(graph.subjects(RDF.type, RA.ContextValue)) | set(graph.subjects(RDF.type, RA.ConditionDimension))
    rules = set(graph.objects(None, DPV.hasRule))
    leftover = bind_prefixes(Graph(), tax.scheme.namespace)
    for triple in graph:
        s, p, _ = triple
        if triple in regenerated or s in vocabulary or (s in rules and p == DPV.hasContext):
            continue
        leftover.add(triple)
    return leftover
