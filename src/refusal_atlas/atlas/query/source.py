"""`source_report` (an external category -> our nodes -> their directions) and `sparql` over atlas.ttl."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from rdflib import Graph

from refusal_atlas.atlas.query.common import _clean, analysed_fallback, selected_layer_position
from refusal_atlas.atlas.query.node import _best_by, _best_direction, _node_directions
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.errors import AtlasError
from refusal_atlas.ontology.io import parse_rdf
from refusal_atlas.ontology.sparql import prepare, run_query


def source_report(store: AtlasStore, curie: str) -> dict[str, Any]:
    """An external category (e.g. `llamaguard3:S9`) -> our nodes (crosswalks) -> their directions.

    A node without directions says why (`why`) and names its nearest analysed ancestor (`fallback`).
    """
    rows = store.crosswalks
    hits = [r for r in rows if r[2] == curie]
    if not hits:
        known = sorted({r[2] for r in rows})
        close = difflib.get_close_matches(curie, known, n=3)
        prefix = curie.split(":", 1)[0]
        same = [k for k in known if k.startswith(prefix + ":")]
        hint = (f"did you mean {', '.join(close)}?" if close else
                f"known {prefix}: categories: {', '.join(same[:15])}" if same else
                f"known prefixes: {', '.join(sorted({k.split(':', 1)[0] for k in known}))}")
        raise AtlasError(f"{curie!r} is mapped to no node of this atlas; {hint}")
    tax = store.taxonomy
    dm = store.direction_metrics
    with_dirs = set(dm["node"]) if dm is not None else set()
    selected = selected_layer_position(store)
    nodes = []
    seen: set[str] = set()
    for node, predicate, _, _ in hits:
        targets: list[tuple[str, str | None]] = [(node, None)]
        if tax is not None and node in tax.nodes:
            targets += [(d, node) for d in tax.descendants(node) if d in with_dirs]
        for target, via in targets:
            if target in seen:
                continue
            seen.add(target)
            entry: dict[str, Any] = {"node": target, "label": store.node_label(target), "predicate": predicate,
                                     "via": via}
            dirs = _node_directions(store, target)
            entry["best"] = _best_direction(dirs, selected)
            entry["best_of"] = target if dirs else None
            entry["n_directions"] = len(dirs or [])
            if entry["best"] is None:
                fallback = analysed_fallback(store, target)
                entry["why"] = (fallback or {}).get("reason") or "no directions in this atlas (stage not run)"
                entry["fallback"] = (fallback or {}).get("ancestor")
                if entry["fallback"]:  # the ancestor's direction answers for it, and says so (`best_of`)
                    entry["best"] = _best_direction(_node_directions(store, entry["fallback"]), selected)
                    entry["best_of"] = entry["fallback"]
            entry["best_by"] = _best_by(entry["best"])
            nodes.append(entry)
    return _clean({"source": curie, "label": hits[0][3], "nodes": nodes,
                   "directions_available": dm is not None})


def sparql(store: AtlasStore, query: str) -> dict[str, Any]:
    """SPARQL over atlas.ttl (else taxonomy.ttl); `query` may be a .rq/.sparql file.

    Runs through the ontology layer's offline runner: our prefixes are pre-bound and SERVICE /
    FROM clauses (which would make rdflib fetch IRIs) are refused.
    """
    path = store.atlas_ttl if store.atlas_ttl.is_file() else store.taxonomy_ttl
    store.require("atlas.ttl", path.is_file())
    text = query
    candidate = Path(query) if len(query) < 4096 and "\n" not in query else None
    if candidate is not None and candidate.suffix.lower() in (".rq", ".sparql", ".txt") and candidate.is_file():
        try:
            text = candidate.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise AtlasError(f"{candidate}: not UTF-8 text (byte {exc.start}); save the query as UTF-8") from exc
    graph = parse_rdf(path)
    result = run_query(graph, text)
    if isinstance(result, Graph):
        return {"type": "CONSTRUCT", "turtle": result.serialize(format="turtle")}
    if prepare(text, graph).algebra.name == "AskQuery":
        return {"type": "ASK", "answer": bool(result.rows[0][0])}
    records = result.records()
    return {"type": "SELECT", "vars": result.columns, "rows": [[r[c] for c in result.columns] for r in records]}
