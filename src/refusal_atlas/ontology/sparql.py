"""Run SPARQL over refusal-atlas graphs, offline, and print the answer as a table, CSV or JSON.

Our prefixes (ra, rac, tax, skos, airo, dpv, risk, loc, dct, owl, vann, rdf, rdfs, xsd and the
crosswalk prefixes) are pre-bound, so queries need no PREFIX lines. Queries that would reach
the network (`SERVICE`, `FROM <iri>`, `FROM NAMED`) are refused: rdflib would fetch them.

Limits: a query (a cartesian product, say) can run for hours and fill memory, so `run_query`
takes `timeout_s` and `max_rows`; the CLI always passes them (defaults DEFAULT_TIMEOUT_S and
DEFAULT_MAX_ROWS, options `--timeout` and `--max-rows`). Going past either is a one-line error.
The time limit interrupts rdflib with SIGALRM, which only the main thread receives; elsewhere it
is checked between result rows.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from rdflib import RDF, RDFS, XSD, BNode, Graph, Literal, URIRef
from rdflib.plugins.sparql import prepareQuery
from rdflib.plugins.sparql.parserutils import CompValue
from rich.table import Table
from rich.text import Text

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import brief
from refusal_atlas.ontology.to_rdf import bind_prefixes

OUTPUT_FORMATS = ("table", "csv", "json")
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_ROWS = 100_000


class _QueryTimeout(BaseException):
    """Raised by the alarm; a BaseException so that rdflib's own `except Exception` cannot swallow it."""


def prefixes(graph: Graph | None = None) -> dict[str, str]:
    """Prefix -> namespace for queries: ours, plus whatever the graph itself binds."""
    names = bind_prefixes(Graph())
    out = {p: str(ns) for p, ns in names.namespaces() if p}
    out.update({"rdf": str(RDF), "rdfs": str(RDFS), "xsd": str(XSD)})
    if graph is not None:
        for prefix, ns in graph.namespaces():
            if prefix and prefix not in out:
                out[prefix] = str(ns)
    return out


@dataclass
class QueryTable:
    """A SELECT result (or ASK, as one boolean column) with values as rdflib terms."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # prefix -> namespace, for short display

    def shorten(self, term: Any) -> str:
        """IRIs as prefixed names where a prefix fits; literals as their text; unbound as ''."""
        if term is None:
            return ""
        if isinstance(term, URIRef):
            best = max((ns for ns in self.names.values() if str(term).startswith(ns)), key=len, default=None)
            if best is not None:
                local = str(term)[len(best):]
                prefix = next(p for p, ns in self.names.items() if ns == best)
                if local and all(c.isalnum() or c in "_-." for c in local) and not local.endswith("."):
                    return f"{prefix}:{local}"
            return str(term)
        if isinstance(term, BNode):
            return f"_:{term}"
        return str(term)

    def records(self, *, short: bool = True) -> list[dict[str, Any]]:
        """Rows as dicts; JSON-ready (numbers and booleans keep their type)."""
        out = []
        for row in self.rows:
            item = {}
            for col, term in zip(self.columns, row, strict=True):
                if isinstance(term, Literal) and isinstance(term.toPython(), bool | int | float):
                    item[col] = term.toPython()
                elif isinstance(term, bool):
                    item[col] = term
                else:
                    item[col] = self.shorten(term) if short else ("" if term is None else str(term))
            out.append(item)
        return out

    def to_csv(self, *, short: bool = True) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for record in self.records(short=short):
            writer.writerow([record[c] for c in self.columns])
        return buf.getvalue()

    def to_json(self, *, short: bool = True) -> str:
        return json.dumps(self.records(short=short), ensure_ascii=False, indent=2) + "\n"

    def to_rich(self, title: str | None = None) -> Any:
        table = Table(title=title, show_lines=False)
        for col in self.columns:
            table.add_column(col, overflow="fold")
        for record in self.records():
            # RDF literals are untrusted: Text cells are never parsed as rich markup
            table.add_row(*[Text(str(record[c])) for c in self.columns])
        return table


def _check_offline(node: Any) -> None:
    """Refuse SERVICE and dataset clauses anywhere in the algebra."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, CompValue):
            if item.name == "ServiceGraphPattern":
                raise AtlasError("SPARQL SERVICE (federated query) is refused: refusal-atlas never reaches the "
                                 "network; load the other data with --graph FILE instead")
            if dict.get(item, "datasetClause"):
                raise AtlasError("SPARQL FROM / FROM NAMED is refused (rdflib would fetch the IRI); pass the "
                                 "data with --graph FILE instead")
            stack.extend(item.values())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def prepare(query: str, graph: Graph | None = None) -> Any:
    """Parse a query with our prefixes bound; syntax errors become one-line AtlasErrors.

    Parsed queries are cached: rdflib's parser takes longer than running a canned query.
    """
    return _prepare_cached(query, tuple(sorted(prefixes(graph).items())))


@lru_cache(maxsize=256)
def _prepare_cached(query: str, namespaces: tuple[tuple[str, str], ...]) -> Any:
    try:
        prepared = prepareQuery(query, initNs=dict(namespaces))
    except Exception as exc:  # pyparsing ParseException and friends
        line = getattr(exc, "lineno", None)
        col = getattr(exc, "col", None)
        where = f"line {line}, column {col}: " if line is not None else ""
        msg = str(getattr(exc, "msg", "") or exc).splitlines()[0]
        raise AtlasError(f"SPARQL syntax error: {where}{msg}") from None
    _check_offline(prepared.algebra)
    return prepared


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise _QueryTimeout in the main thread after `seconds` (no-op elsewhere or without a limit)."""
    usable = seconds is not None and seconds > 0 and threading.current_thread() is threading.main_thread() \
        and hasattr(signal, "setitimer")
    if not usable:
        yield
        return
    assert seconds is not None

    def _alarm(signum: int, frame: Any) -> None:
        raise _QueryTimeout

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_query(graph: Graph, query: str, bindings: dict[str, Any] | None = None, *,
              timeout_s: float | None = None, max_rows: int | None = None) -> QueryTable | Graph:
    """SELECT/ASK -> QueryTable; CONSTRUCT/DESCRIBE -> Graph.

    `timeout_s` / `max_rows` (None = no limit) bound the run time and the rows (or triples) of the
    answer; past either, a one-line AtlasError says which and how to raise it.
    """
    prepared = prepare(query, graph)
    started = time.monotonic()

    def too_slow() -> AtlasError:
        return AtlasError(f"SPARQL query stopped after {timeout_s:g} s (the time limit); narrow it (more "
                          "specific patterns, LIMIT) or raise --timeout")

    def too_many(n: int) -> AtlasError:
        return AtlasError(f"SPARQL query returned more than {n:,} rows (the row limit); add LIMIT or "
                          "raise --max-rows")

    names = prefixes(graph)
    try:
        with _time_limit(timeout_s):
            result = graph.query(prepared, initBindings=bindings or {})
            if result.type == "ASK":
                return QueryTable(columns=["ask"], rows=[[bool(result.askAnswer)]], names=names)
            if result.type in ("CONSTRUCT", "DESCRIBE"):
                if max_rows is not None and result.graph is not None and len(result.graph) > max_rows:
                    raise too_many(max_rows)
                out = bind_prefixes(Graph())
                for triple in result:
                    out.add(triple)  # type: ignore[arg-type]
                return out
            columns = [str(v) for v in (result.vars or [])]
            rows: list[list[Any]] = []
            for row in result:  # rows are produced lazily: stop as soon as a limit is passed
                if max_rows is not None and len(rows) >= max_rows:
                    raise too_many(max_rows)
                if timeout_s and time.monotonic() - started > timeout_s:
                    raise too_slow()
                rows.append([row[i] for i in range(len(columns))])  # type: ignore[index]
            return QueryTable(columns=columns, rows=rows, names=names)
    except _QueryTimeout:
        raise too_slow() from None
    except AtlasError:
        raise
    except RecursionError:
        raise AtlasError("SPARQL query too deeply nested for rdflib; simplify it") from None
    except Exception as exc:
        raise AtlasError(f"SPARQL query failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None


def format_result(result: QueryTable | Graph, fmt: str = "table") -> str:
    """Text for csv/json (tables) or Turtle (graphs); 'table' is rendered by the CLI with rich."""
    if isinstance(result, Graph):
        return result.serialize(format="turtle")
    if fmt == "csv":
        return result.to_csv()
    if fmt == "json":
        return result.to_json()
    raise AtlasError(f"unknown output format {brief(fmt)}; use one of {', '.join(OUTPUT_FORMATS)}")
