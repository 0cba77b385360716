"""CLI: `refusal-atlas ontology ...` (thin layer over refusal_atlas.ontology).

export / import move a taxonomy between YAML and RDF; validate runs the SHACL shapes plus the
checks SHACL cannot do; sparql and the canned queries (descendants, conditions, mapped-to,
contextual) query an exported graph, by default the shipped taxonomy. Problems are AtlasErrors:
the main entry prints them one per line and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rdflib import Graph
from rich.console import Console

from refusal_atlas.cli.console import plain_console, sub_app
from refusal_atlas.cli.options import number
from refusal_atlas.cli.taxonomy import TaxonomyAliasOpt, one_taxonomy_dir
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import check_not_same_file, read_utf8
from refusal_atlas.ontology import queries
from refusal_atlas.ontology.export import build_graph, import_graph
from refusal_atlas.ontology.io import normalise_format, parse_rdf, serialize, write_graph
from refusal_atlas.ontology.shacl import validate_graph
from refusal_atlas.ontology.sparql import (
    DEFAULT_MAX_ROWS,
    DEFAULT_TIMEOUT_S,
    OUTPUT_FORMATS,
    QueryTable,
    format_result,
    run_query,
)

app = sub_app("YAML <-> RDF, SHACL validation, SPARQL and canned queries.")

FormatOpt = Annotated[str | None, typer.Option(
    "--format", "-f", help="RDF format: turtle | json-ld | nt | xml (default: from the file extension).")]
GraphOpt = Annotated[list[Path] | None, typer.Option(
    "--graph", "-g", help="RDF file(s) to query (repeatable; default: the exported shipped taxonomy).")]
OutFormatOpt = Annotated[str, typer.Option("--format", "-f", help="Output: table | csv | json.")]
MaxSizeOpt = Annotated[float | None, typer.Option(
    "--max-size-mb", callback=number(0.0, above=True),
    help="Refuse RDF input larger than this (default 20, or REFUSAL_ATLAS_MAX_RDF_MB).")]


def _console() -> Console:
    # RDF literals and IRIs are untrusted text: never markup
    return plain_console()


def _max_bytes(max_size_mb: float | None) -> int | None:
    return int(max_size_mb * 1_000_000) if max_size_mb is not None else None


def _load_graphs(files: list[Path] | None, max_size_mb: float | None = None) -> Graph:
    if not files:
        return build_graph()
    graph = Graph()
    for file in files:
        part = parse_rdf(file, max_bytes=_max_bytes(max_size_mb))
        for prefix, ns in part.namespaces():
            graph.bind(prefix, ns, override=False)
        graph += part
    return graph


def _emit(table: QueryTable, fmt: str, title: str | None = None) -> None:
    if fmt not in OUTPUT_FORMATS:
        raise AtlasError(f"unknown output format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "table":
        _console().print(table.to_rich(title=title))
        if not table.rows:
            typer.echo("(no results)", err=True)
    else:
        sys.stdout.write(format_result(table, fmt))


@app.command()
def export(
    directory: Annotated[Path | None, typer.Argument(help="Taxonomy directory (default: shipped).")] = None,
    fmt: FormatOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
    conditions: Annotated[Path | None, typer.Option(
        help="Condition vocabulary (default: DIR/conditions.yaml, else the shipped one).")] = None,
    crosswalks: Annotated[Path | None, typer.Option(
        help="Folder of *.sssom.tsv to include "
             "(default: DIR/crosswalks/, else the shipped ones for the shipped taxonomy).")] = None,
    no_crosswalks: Annotated[bool, typer.Option("--no-crosswalks", help="Leave crosswalk mappings out.")] = False,
    taxonomy_dir: TaxonomyAliasOpt = None,
) -> None:
    """Write the taxonomy as RDF (SKOS + AIRO + DPV)."""
    directory = one_taxonomy_dir(directory, taxonomy_dir)
    graph = build_graph(directory, conditions=conditions, crosswalks=crosswalks,
                        with_crosswalks=False if no_crosswalks else None)
    if output is None:
        sys.stdout.write(serialize(graph, normalise_format(fmt or "turtle")))
        return
    check_not_same_file(output, directory, conditions)
    write_graph(graph, output, fmt)
    typer.echo(f"wrote {output} ({len(graph)} triples)", err=True)


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="RDF file holding one skos:ConceptScheme.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Taxonomy directory to write.")],
    fmt: FormatOpt = None,
    existing: Annotated[Path | None, typer.Option(
        help="Existing taxonomy directory whose comments and file split to keep (may equal -o).")] = None,
    max_size_mb: MaxSizeOpt = None,
) -> None:
    """Write RDF back as the YAML layout; triples YAML cannot hold go to DIR.rejects.ttl."""
    check_not_same_file(output, file)
    graph = parse_rdf(file, fmt, max_bytes=_max_bytes(max_size_mb))
    result = import_graph(graph, output, existing_dir=existing, source=str(file))
    typer.echo(f"wrote {len(result.taxonomy)} nodes to {output} ({len(result.written)} files)")
    if result.rejects is not None:
        typer.echo(f"{result.rejected_triples} triples the YAML cannot hold (crosswalk mappings, other "
                   f"languages, extra annotations) written to {result.rejects}", err=True)


@app.command()
def validate(
    file: Annotated[Path, typer.Argument(help="RDF file to check.")],
    fmt: FormatOpt = None,
    max_size_mb: MaxSizeOpt = None,
) -> None:
    """SHACL shapes (data/ontology/shapes.ttl) plus broader-cycle checks; one violation per line."""
    graph = parse_rdf(file, fmt, max_bytes=_max_bytes(max_size_mb))
    problems = validate_graph(graph)
    if problems:
        raise AtlasError("\n".join(f"{file}: {p}" for p in problems))
    typer.echo(f"{file}: conforms ({len(graph)} triples)")


@app.command()
def sparql(
    query: Annotated[str, typer.Argument(help="A SPARQL query, or a file holding one.")],
    graph: GraphOpt = None,
    fmt: OutFormatOpt = "table",
    max_size_mb: MaxSizeOpt = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", callback=number(0.0),
        help="Stop the query after this many seconds (0 = no limit).")] = DEFAULT_TIMEOUT_S,
    max_rows: Annotated[int, typer.Option(
        "--max-rows", min=0,
        help="Refuse answers with more rows (or triples) than this (0 = no limit).")] = DEFAULT_MAX_ROWS,
) -> None:
    """Run a SELECT / ASK / CONSTRUCT query; prefixes ra, rac, tax, skos, airo, dpv, ... are pre-bound.

    Limits: 60 s and 100,000 rows by default (--timeout, --max-rows); past either, a one-line error.
    """
    if timeout < 0 or max_rows < 0:
        raise AtlasError("--timeout and --max-rows must be 0 (no limit) or more")
    text = _query_text(query)
    result = run_query(_load_graphs(graph, max_size_mb), text, timeout_s=timeout or None, max_rows=max_rows or None)
    if isinstance(result, Graph):
        sys.stdout.write(result.serialize(format="turtle"))
        return
    _emit(result, fmt)


def _query_text(query: str) -> str:
    """The argument itself, or the contents of the file it names."""
    candidate = Path(query)
    try:
        is_file = "\n" not in query and candidate.is_file()
    except OSError:  # e.g. a long query is not a valid file name
        is_file = False
    if is_file:
        return read_utf8(candidate, "query file")
    if candidate.suffix in (".rq", ".sparql") and not any(c.isspace() for c in query):
        raise AtlasError(f"{candidate}: query file not found")
    return query


NodeIdArg = Annotated[str, typer.Argument(metavar="ID", help="Node id.")]
ExternalArg = Annotated[str, typer.Argument(metavar="EXTERNAL", help="CURIE such as llamaguard3:S9, or an IRI.")]


def _lookup_command(name: str, query: Callable[[Graph, str], QueryTable], argument: Any, title: str,
                    doc: str) -> None:
    """Register `name`: a canned query that takes one argument (`argument`, an Annotated typer.Argument) and
    prints the rows under `title` (`{}` stands for the argument); `doc` is its help."""

    def command(value: str, graph: GraphOpt = None, fmt: OutFormatOpt = "table") -> None:
        _emit(query(_load_graphs(graph), value), fmt, title.format(value))

    command.__annotations__["value"] = argument  # typer reads the argument's metavar and help from it
    command.__doc__ = doc
    app.command(name)(command)


_lookup_command("descendants", queries.descendants, NodeIdArg, "descendants of {}",
                "Every node below ID (through all parents), with its own expected behaviour.")
_lookup_command("conditions", queries.conditions, NodeIdArg, "condition rules for {}",
                "Every condition rule that applies to ID: its own, then inherited ones with their source node.")
_lookup_command("mapped-to", queries.mapped_to, ExternalArg, "nodes mapped to {}",
                "Our nodes that a crosswalk maps to an external category.")


@app.command()
def contextual(
    graph: GraphOpt = None,
    fmt: OutFormatOpt = "table",
) -> None:
    """Nodes whose expected behaviour changes under some condition (user age, purpose, ...)."""
    _emit(queries.contextual(_load_graphs(graph)), fmt, "context-dependent nodes")
