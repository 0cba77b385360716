"""CLI: `refusal-atlas query node|direction|source|sparql` (thin layer over refusal_atlas.atlas.query).

Every command prints a rich table by default and the library's dict as JSON with `--json`.
A missing atlas folder or stage is a one-line AtlasError telling the user to run `refusal-atlas run`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from refusal_atlas.atlas import query as q
from refusal_atlas.atlas.store import AtlasStore

AtlasOpt = Annotated[Path, typer.Option("--atlas", "-a", help="Atlas folder written by `refusal-atlas run`.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
DEFAULT_ATLAS = Path("atlas-out")


def _console() -> Console:
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*[Text(_fmt(v)) for v in row])  # Text: corpus strings are never parsed as markup
    return table


def show_node(report: dict[str, Any], console: Console) -> None:
    """Render `node_report` as a few tables (text is printed as plain text, never as markup)."""
    console.print(Text(f"{report['node']} — {report['label']}", style="bold"))
    if report.get("definition"):
        console.print(Text(report["definition"]))
    if report.get("default"):
        console.print(Text(f"default: {report['default']}; broader: {', '.join(report.get('broader') or []) or '–'}"))
    rules = report.get("rules") or []
    if rules:
        console.print(_table("conditions (own and inherited)", ["from", "when", "expect", "rationale"],
                             [[r["from"], r["when"], r["expect"], r.get("rationale")] for r in rules]))
    dirs = report.get("directions")
    if dirs is None:
        console.print("directions: not run")
    else:
        positions = list(dict.fromkeys(d["position"] for d in dirs))
        by_layer: dict[int, dict[str, dict]] = {}
        for d in dirs:
            by_layer.setdefault(d["layer"], {})[d["position"]] = d

        def cell(d: dict | None) -> str:
            if not d:
                return "–"
            auroc = f" auc {_fmt(d.get('auroc'), 2)}" if d.get("auroc") is not None else ""
            rel, floor, norm = _fmt(d.get("reliability"), 2), _fmt(d.get("noise_floor"), 2), _fmt(d.get("norm"), 1)
            return f"{rel} / {floor} |{norm}|{auroc}"

        console.print(_table("directions (diff_means): reliability / noise floor |norm| AUROC, by layer and position",
                             ["layer", *positions],
                             [[layer, *[cell(row.get(p)) for p in positions]]
                              for layer, row in sorted(by_layer.items())]))
        best = report.get("best")
        if best:
            console.print(Text(f"best: layer {best['layer']} position {best['position']} "
                               f"(reliability {_fmt(best.get('reliability'))})"))
    near = report.get("nearest") or []
    console.print(_table("nearest nodes", ["node", "label", "cosine", "noise floor / CI", "from"],
                         [[n["node"], n["label"], n.get("cosine"),
                           n.get("noise_floor") if n.get("noise_floor") is not None else
                           (f"[{_fmt(n.get('ci_low'))}, {_fmt(n.get('ci_high'))}]" if "ci_low" in n else None),
                           n.get("source")] for n in near]) if near else "nearest nodes: not run")
    clusters = report.get("clusters") or []
    console.print(_table("clusters mapped here", ["cluster", "label", "size", "score"],
                         [[c["cluster"], c["label"], c["size"], c["score"]] for c in clusters])
                  if clusters else "clusters mapped here: none")
    for key, title in (("cross_ablation", "cross-ablation (ablating this node's direction)"),
                       ("condition_table", "conditions (causal)"), ("adherence", "organism adherence")):
        rows = report.get(key)
        if rows is None:
            console.print(f"{title}: not run")
        elif rows:
            cols = list(rows[0])
            console.print(_table(title, cols, [[r.get(c) for c in cols] for r in rows]))


def show_ranking(result: dict[str, Any], console: Console, limit: int) -> None:
    layers = result["layers"]
    title = (f"harm sources closest to {result['source']} (shape {result['shape']}, position {result['position']}, "
             f"{'layer ' + str(layers[0]) if len(layers) == 1 else 'best of layers ' + str(layers)})")
    rows = [[r["rank"], r["node"], r.get("label"), r["cosine"], r.get("layer"), r.get("noise_floor"),
             r.get("ceiling"), r.get("match")] for r in result["ranking"][:limit]]
    console.print(_table(title, ["#", "node", "label", "cosine", "layer", "noise floor", "ceiling", "match"], rows))
    pooled = result.get("pooled")
    if pooled:
        console.print(f"pooled refusal direction: cosine {_fmt(pooled['cosine'])} at layer {pooled['layer']}")


def show_source(result: dict[str, Any], console: Console) -> None:
    rows = []
    for n in result["nodes"]:
        best = n.get("best") or {}
        rows.append([n["node"], n["label"], n["predicate"], n.get("via"), best.get("layer"), best.get("position"),
                     best.get("reliability"), best.get("norm")])
    console.print(_table(f"{result['source']} ({result.get('label') or ''}) -> nodes -> best direction",
                         ["node", "label", "mapping", "via", "layer", "position", "reliability", "norm"], rows))
    if not result.get("directions_available"):
        console.print("directions: not run")


def show_sparql(result: dict[str, Any], console: Console) -> None:
    if result["type"] == "ASK":
        console.print("true" if result["answer"] else "false")
    elif result["type"] == "SELECT":
        console.print(_table(f"{len(result['rows'])} row(s)", result["vars"], result["rows"]))
    else:
        typer.echo(result["turtle"])


def register_query(query_app: typer.Typer) -> None:
    """Add `node`, `direction`, `source` and `sparql` to the `query` sub-app."""

    @query_app.command("node")
    def node_cmd(node_id: Annotated[str, typer.Argument(help="Taxonomy node id, e.g. weapons.explosives.")],
                 atlas: AtlasOpt = DEFAULT_ATLAS, as_json: JsonOpt = False,
                 nearest: Annotated[int, typer.Option(help="How many nearest nodes to list.")] = 5) -> None:
        """A node's directions per layer and position, nearest nodes, clusters, cross-ablation, conditions."""
        report = q.node_report(AtlasStore.open(atlas), node_id, nearest=nearest)
        _print_json(report) if as_json else show_node(report, _console())

    @query_app.command("direction")
    def direction_cmd(
        file: Annotated[Path, typer.Argument(help="Vector file: .safetensors, .npy or .pt; [d] or [layers, d].")],
        atlas: AtlasOpt = DEFAULT_ATLAS, as_json: JsonOpt = False,
        layer: Annotated[int | None, typer.Option(help="Compare at this layer only (default: best layer).")] = None,
        position: Annotated[str | None, typer.Option(help="Token position (default: the refusal position).")] = None,
        key: Annotated[str | None, typer.Option(help="Tensor name inside a multi-tensor file.")] = None,
        method: Annotated[str, typer.Option(help="Compare with the nodes' diff_means, vs_other or residual "
                                                 "directions.")] = "diff_means",
        limit: Annotated[int, typer.Option(help="Rows to show in the table.")] = 20,
    ) -> None:
        """Which harm sources does this direction correspond to? Cosine per node beside its noise floor."""
        store = AtlasStore.open(atlas)
        result = q.rank_direction(store, q.load_vector(file, key), layer=layer, position=position, method=method,
                                  source=str(file))
        _print_json(result) if as_json else show_ranking(result, _console(), limit)

    @query_app.command("source")
    def source_cmd(external: Annotated[str, typer.Argument(help="External category CURIE, e.g. llamaguard3:S9.")],
                   atlas: AtlasOpt = DEFAULT_ATLAS, as_json: JsonOpt = False) -> None:
        """An external category -> our nodes (crosswalks) -> their directions."""
        result = q.source_report(AtlasStore.open(atlas), external)
        _print_json(result) if as_json else show_source(result, _console())

    @query_app.command("sparql")
    def sparql_cmd(query: Annotated[str, typer.Argument(help="SPARQL text, or a .rq/.sparql file.")],
                   atlas: AtlasOpt = DEFAULT_ATLAS, as_json: JsonOpt = False) -> None:
        """SPARQL over atlas.ttl (prefixes ra:, skos:, tax:, dpv:, airo: ... are predeclared)."""
        result = q.sparql(AtlasStore.open(atlas), query)
        _print_json(result) if as_json else show_sparql(result, _console())
