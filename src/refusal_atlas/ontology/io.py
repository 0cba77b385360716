"""Reading and writing RDF files safely.

RDF from elsewhere is untrusted input, so parsing here:
- refuses files above a size limit before reading them (default 20 MB; `max_bytes=` or the
  environment variable REFUSAL_ATLAS_MAX_RDF_MB), so a huge file cannot exhaust memory or time;
- never fetches anything: rdflib does not follow `owl:imports`, JSON-LD remote `@context` /
  `@import` references are refused before rdflib could fetch them, and RDF/XML entity
  declarations (the billion-laughs / external-entity family) are refused;
- turns every parser error into an AtlasError `path:line:column: message`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from rdflib import Graph

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write_text, brief
from refusal_atlas.ontology.to_rdf import bind_prefixes

DEFAULT_MAX_MB = 20.0
FORMATS = {
    "turtle": "turtle", "ttl": "turtle",
    "json-ld": "json-ld", "jsonld": "json-ld",
    "nt": "nt", "ntriples": "nt", "n-triples": "nt",
    "xml": "xml", "rdf": "xml", "rdfxml": "xml", "rdf/xml": "xml",
}
EXTENSIONS = {
    ".ttl": "turtle", ".turtle": "turtle",
    ".jsonld": "json-ld", ".json": "json-ld",
    ".nt": "nt",
    ".rdf": "xml", ".xml": "xml",
}
SUFFIX_FOR = {"turtle": ".ttl", "json-ld": ".jsonld", "nt": ".nt", "xml": ".rdf"}


def normalise_format(fmt: str) -> str:
    """One of turtle | json-ld | nt | xml, from any of their usual names."""
    key = fmt.strip().lower()
    if key not in FORMATS:
        raise AtlasError(f"unknown RDF format {brief(fmt)}; use one of turtle, json-ld, nt, xml")
    return FORMATS[key]


def max_bytes_default() -> int:
    raw = os.environ.get("REFUSAL_ATLAS_MAX_RDF_MB")
    try:
        mb = float(raw) if raw else DEFAULT_MAX_MB
    except ValueError:
        raise AtlasError(f"REFUSAL_ATLAS_MAX_RDF_MB={brief(raw)} is not a number of megabytes") from None
    return int(mb * 1_000_000)


def guess_format(path: Path, head: bytes) -> str:
    """By extension; `.owl` and unknown extensions are sniffed (AIRO's .owl file is Turtle)."""
    suffix = path.suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"<?xml", b"<rdf:RDF", b"<!DOCTYPE")):
        return "xml"
    if text.startswith((b"{", b"[")):
        return "json-ld"
    return "turtle"


def parse_rdf(path: Path | str, fmt: str | None = None, *, max_bytes: int | None = None) -> Graph:
    """Parse one RDF file into a Graph (see the module docstring for the safety rules)."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"{path}: no such file")
    limit = max_bytes if max_bytes is not None else max_bytes_default()
    size = path.stat().st_size
    if size > limit:
        raise AtlasError(f"{path}: {size / 1e6:.1f} MB is above the {limit / 1e6:.0f} MB limit for RDF input; "
                         "split the file or raise the limit with REFUSAL_ATLAS_MAX_RDF_MB")
    data = path.read_bytes()
    kind = normalise_format(fmt) if fmt else guess_format(path, data[:512])
    return parse_rdf_bytes(data, kind, str(path))


def parse_rdf_bytes(data: bytes, fmt: str, shown: str = "<data>") -> Graph:
    """Parse RDF bytes of a known format; errors name `shown`, the line and the column."""
    fmt = normalise_format(fmt)
    graph = bind_prefixes(Graph())
    if fmt == "json-ld":
        text = _decode(data, shown)
        _check_json_ld(text, shown)
        source: Any = text
    elif fmt == "xml":
        if re.search(rb"<!ENTITY", data):
            raise AtlasError(f"{shown}: RDF/XML with <!ENTITY> declarations is refused (entity expansion can "
                             "exhaust memory or read local files); remove the DOCTYPE")
        source = data
    else:
        source = _decode(data, shown)
    try:
        graph.parse(data=source, format=fmt, publicID="urn:refusal-atlas:input")
    except AtlasError:
        raise
    except RecursionError:
        raise AtlasError(f"{shown}: {fmt} input is nested too deeply to parse") from None
    except Exception as exc:  # every parser has its own error types; all become one located line
        raise AtlasError(_located(exc, data, fmt, shown)) from None
    return graph


def _decode(data: bytes, shown: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise AtlasError(f"{shown}:{line}:{col}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                         "re-save the file as UTF-8") from None


def _check_json_ld(text: str, shown: str) -> None:
    """Valid JSON, and no context that would make rdflib fetch a remote document."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AtlasError(f"{shown}:{exc.lineno}:{exc.colno}: JSON-LD syntax error: {exc.msg}") from None
    except RecursionError:
        raise AtlasError(f"{shown}: JSON-LD input is nested too deeply to parse") from None
    remote = _remote_contexts(doc)
    if remote:
        raise AtlasError(f"{shown}: JSON-LD refers to a remote context ({remote[0]}), which is never fetched; "
                         "inline the context object in the file")


def _remote_contexts(doc: Any) -> list[str]:
    found: list[str] = []
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("@context", "@import"):
                    values = value if isinstance(value, list) else [value]
                    found.extend(v for v in values if isinstance(v, str))
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _located(exc: Exception, data: bytes, fmt: str, shown: str) -> str:
    """`shown:line:col: <format> syntax error: why` from whatever the parser raised."""
    why = _first_line(str(getattr(exc, "_why", "") or getattr(exc, "_msg", "") or exc))
    line = col = None
    if hasattr(exc, "lines") and hasattr(exc, "_i"):  # notation3.BadSyntax (Turtle)
        text = getattr(exc, "_str", data)
        index = int(exc._i)
        raw = text if isinstance(text, bytes | str) else data
        newline = "\n" if isinstance(raw, str) else b"\n"
        line = int(exc.lines) + 1
        col = index - (raw.rfind(newline, 0, index) + 1) + 1  # type: ignore[arg-type]
    elif hasattr(exc, "getLineNumber"):  # SAX (RDF/XML)
        sax: Any = exc  # xml.sax's SAXParseException
        line, col = sax.getLineNumber(), sax.getColumnNumber() + 1
    elif fmt == "nt":
        line, col = _first_bad_nt_line(data)
    elif hasattr(exc, "lineno"):
        line, col = exc.lineno, getattr(exc, "colno", 1)
    where = f"{shown}:{line}:{col}" if line is not None else shown
    return f"{where}: {fmt} syntax error: {why}"


def _first_line(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else "invalid input"
    return text[:300]


def _first_bad_nt_line(data: bytes) -> tuple[int | None, int | None]:
    """N-Triples errors carry no position; parse line by line to find the first bad one."""
    for number, raw in enumerate(data.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        try:
            Graph().parse(data=raw, format="nt")
        except Exception:
            return number, len(raw) - len(raw.lstrip()) + 1
    return None, None


def serialize(graph: Graph, fmt: str = "turtle") -> str:
    """The graph as text; JSON-LD is compacted with our prefixes so it stays readable."""
    fmt = normalise_format(fmt)
    if fmt == "json-ld":
        context = {prefix: str(ns) for prefix, ns in graph.namespaces() if prefix}
        return graph.serialize(format="json-ld", context=context, auto_compact=True)
    return graph.serialize(format=fmt)


def write_graph(graph: Graph, path: Path | str, fmt: str | None = None) -> Path:
    """Serialise atomically (temporary file + rename); format from `fmt` or the extension."""
    path = Path(path)
    kind = normalise_format(fmt) if fmt else EXTENSIONS.get(path.suffix.lower(), "turtle")
    atomic_write_text(path, serialize(graph, kind))
    return path
