"""CLI: `refusal-atlas query node|direction|source|sparql` (thin layer over refusal_atlas.atlas.query).

Every command prints rich tables by default and the library's dict as JSON with `--json`.
A missing atlas folder or stage is a one-line AtlasError telling the user to run `refusal-atlas run`.
Every string that comes from the atlas (labels, ids, file names, SPARQL values) is printed as a rich
`Text`, never parsed as markup, so `[/]` or `[link=…]` in a label prints literally.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from refusal_atlas.atlas import query as q
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.cli.sae import register_feature_query, show_node_features
from refusal_atlas.terminal import safe_console

AtlasOpt = Annotated[Path, typer.Option("--atlas", "-a", help="Atlas folder written by `refusal-atlas run`.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
DEFAULT_ATLAS = Path("atlas-out")
CELL_LEGEND = ("reliability = split-half correlation of the direction (Spearman-Brown corrected: the cosine two "
               "independent full-sample estimates reach); noise floor = mean cosine between the directions of two "
               "random halves of the prompts; norm = length of the mean difference; AUROC = node vs harmless "
               "prompts, held out; * = the layer and position the causal stage selected; – = not measured")
CROSS_ABLATION_COLUMNS = ("evaluated", "method", "refusal_rate", "refusal_measure", "logit_score", "harmless_kl", "n")


def _console() -> Console:
    """A terminal's own width; piped output 160 columns unless COLUMNS says otherwise."""
    console = safe_console(highlight=False)
    if console.is_terminal:
        return console
    columns = os.environ.get("COLUMNS", "")
    return safe_console(highlight=False, width=int(columns) if columns.isdigit() and int(columns) >= 60 else 160)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if value != value else f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)


def _line(text: str, style: str = "") -> Text:
    """One line of output; `text` may hold atlas strings, so it is never parsed as markup."""
    return Text(text, style=style)


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _table(console: Console, title: str, columns: list[str], rows: list[list[Any]], *,
           wide: tuple[str, ...] = ("label", "definition", "rationale", "when", "why", "note")) -> None:
    """Print a title line and a table: numbers and ids never wrap; only free-text columns fold."""
    console.print(_line(title, "bold"))
    table = Table(show_header=True, header_style="bold")
    for col in columns:
        free = col in wide
        table.add_column(Text(col), overflow="fold", no_wrap=not free, min_width=16 if free else min(len(col), 12),
                         ratio=1 if free else None)
    for row in rows:
        table.add_row(*[Text(_fmt(v)) for v in row])
    console.print(table)


def _legend(console: Console, text: str) -> None:
    console.print(_line(text, "dim"))


def _directions_grid(report: dict[str, Any], console: Console, position: str | None = None) -> None:
    """One row per layer at one token position (the selected one unless `position`), numbers in their own
    columns, so the table fits a terminal; every position is in `--json`."""
    dirs = report.get("directions")
    if dirs is None:
        console.print(_line("directions: not run (no directions/ in this atlas)"))
        return
    fallback = report.get("fallback")
    if fallback:
        console.print(_line(f"{report['node']}: {fallback['reason']}; {fallback['note']}.", "bold"))
    if not dirs:
        return
    best = report.get("best") or {}
    positions = list(dict.fromkeys(str(d["position"]) for d in dirs))
    shown_pos = position if position is not None else str(best.get("position", positions[0]))
    if shown_pos not in positions:
        console.print(_line(f"position {shown_pos!r} has no direction here; positions: {', '.join(positions)}"))
        return
    rows = sorted((d for d in dirs if str(d["position"]) == shown_pos), key=lambda d: int(d["layer"]))
    shown = report.get("directions_of") or report["node"]
    where = {"branches": "branch set, causally tested", "tree": "tree set, floors only"}.get(
        str(report.get("direction_set")), str(report.get("direction_set") or ""))
    mark = int(best["layer"]) if best and str(best.get("position")) == shown_pos else None
    _table(console, f"directions of {shown} ({where}), diff_means, position {shown_pos}, by layer",
           ["layer", "reliability", "noise floor", "norm", "AUROC", "selected"],
           [[d["layer"], d.get("reliability"), d.get("noise_floor"), d.get("norm"), d.get("auroc"),
             "*" if int(d["layer"]) == mark else ""] for d in rows])
    _legend(console, CELL_LEGEND)
    if report.get("same_prompts_as"):
        console.print(_line(f"note: every prompt of {shown} kept after the behaviour filter belongs to "
                            f"{report['same_prompts_as']}, so the two directions are the same estimate", "bold"))
    if len(positions) > 1:
        _legend(console, f"other positions: {', '.join(p for p in positions if p != shown_pos)} (--position P, "
                         "or --json for all)")
    if best:
        console.print(_line(f"selected direction: layer {best['layer']}, position {best['position']}, reliability "
                            f"{_fmt(best.get('reliability'))}, noise floor {_fmt(best.get('noise_floor'))} "
                            f"(chosen by {report.get('best_by')})"))


def show_node(report: dict[str, Any], console: Console, position: str | None = None) -> None:
    """Render `node_report` as a few tables (text is printed as plain text, never as markup)."""
    console.print(_line(f"{report['node']} — {report['label']}", "bold"))
    if report.get("definition"):
        console.print(_line(report["definition"]))
    if report.get("default"):
        console.print(_line(f"default: {report['default']}; broader: {', '.join(report.get('broader') or []) or '–'}"))
    rules = report.get("rules") or []
    if rules:
        _table(console, "conditions (own and inherited)", ["from", "when", "expect", "rationale"],
               [[r["from"], r["when"], r["expect"], r.get("rationale")] for r in rules])
    _directions_grid(report, console, position)
    near = report.get("nearest") or []
    if near:
        _table(console, "nearest nodes", ["node", "label", "noise-corrected cosine", "its 95% CI", "raw cosine",
                                          "its noise floor", "from"],
               [[n["node"], n["label"], n.get("cos_debiased"),
                 f"[{_fmt(n.get('debiased_ci_low'))}, {_fmt(n.get('debiased_ci_high'))}]"
                 if n.get("debiased_ci_low") is not None else None,
                 n.get("cosine"), n.get("noise_floor", n.get("floor_b")), n.get("source")] for n in near])
        _legend(console, "at the selected layer and position: the noise-corrected cosine estimates the cosine between "
                         "the two true directions, with its bootstrap 95% CI (upper bound below 1: distinguishable); "
                         "the raw cosine of the two estimates is pulled toward 0 by sampling noise; its noise floor = "
                         "the other node's split-half cosine; from overlap = an edge of the overlap graph (corrected "
                         "cosine's lower bound > 0), from directions = nodes of the same depth")
    else:
        console.print(_line("nearest nodes: none (no overlap edge and no direction to compare)"))
    clusters = report.get("clusters") or []
    if clusters:
        _table(console, "clusters mapped here", ["cluster", "label", "size", "score"],
               [[c["cluster"], c["label"], c["size"], c["score"]] for c in clusters])
    else:
        console.print(_line("clusters mapped here: none"))
    show_node_features(report, console)
    for key, title in (("cross_ablation", "cross-ablation (ablating this node's direction)"),
                       ("condition_table", "conditions (causal)"), ("adherence", "organism adherence")):
        rows = report.get(key)
        if rows is None:
            console.print(_line(f"{title}: not run"))
        elif rows:
            cols = list(rows[0])
            if key == "cross_ablation":
                cols = [c for c in CROSS_ABLATION_COLUMNS if c in cols]
            _table(console, title, cols, [[r.get(c) for c in cols] for r in rows])
        else:
            console.print(_line(f"{title}: no rows for this node"))


def show_ranking(result: dict[str, Any], console: Console, limit: int) -> None:
    layers = result["layers"]
    where = f"layer {layers[0]}" if len(layers) == 1 else f"best of layers {layers[0]}–{layers[-1]}"
    title = (f"harm sources closest to {result['source']} (shape {result['shape']}, position {result['position']}, "
             f"{where}: {result.get('layer_choice')})")
    one_layer = len(layers) == 1
    rows = [[r["rank"], r["node"], r.get("label"), r["cosine"], r.get("p_value"),
             "yes" if r.get("above_chance") else "n.s.", *([] if one_layer else [r.get("layer")]),
             r.get("noise_floor"), r.get("ceiling"), r.get("match"), r.get("set")] for r in result["ranking"][:limit]]
    _table(console, title, ["#", "node", "label", "cosine", "p", "above chance", *([] if one_layer else ["layer"]),
                            "noise floor", "ceiling", "match", "set"], rows)
    chance = result.get("chance") or {}
    searched = chance.get("n_searched") or {}
    _legend(console, f"p: share of {chance.get('draws')} random unit directions (seed {chance.get('seed')}) whose "
                     f"best cosine over the same {searched.get('layers', '?')} layer(s), 1 position and "
                     f"{searched.get('nodes', '?')} nodes reaches this one (corrected for all three searches); above "
                     f"chance when p < {chance.get('alpha')}, n.s. = not significant; set: branches = causally "
                     "tested branch directions, tree = directions of deeper or smaller nodes (floors only)")
    _legend(console, result.get("match_legend") or q.MATCH_LEGEND)
    n_sig = sum(1 for r in result["ranking"] if r.get("above_chance"))
    if not n_sig:
        console.print(_line("no node is above chance: this vector matches no harm source better than a random "
                            "direction would", "bold"))
    pooled = result.get("pooled")
    if pooled:
        console.print(_line(f"pooled refusal direction: cosine {_fmt(pooled['cosine'])} at layer {pooled['layer']} "
                            f"(p {_fmt(pooled.get('p_value'))})"))


def show_source(result: dict[str, Any], console: Console) -> None:
    rows = []
    for n in result["nodes"]:
        best = n.get("best") or {}
        note = None
        if n.get("best_of") != n["node"]:
            note = n.get("why") or "no direction"
            note += (f"; showing its nearest analysed ancestor {n['fallback']}" if n.get("fallback") else
                     "; no analysed ancestor")
        rows.append([n["node"], n["label"], n["predicate"], n.get("via"), best.get("layer"), best.get("position"),
                     best.get("reliability"), best.get("norm"), note])
    _table(console, f"{result['source']} ({result.get('label') or ''}) -> nodes -> best direction",
           ["node", "label", "mapping", "via", "layer", "position", "reliability", "norm", "note"], rows)
    if not result.get("directions_available"):
        console.print(_line("directions: not run"))


def show_sparql(result: dict[str, Any], console: Console) -> None:
    if result["type"] == "ASK":
        console.print(_line("true" if result["answer"] else "false"))
    elif result["type"] == "SELECT":
        _table(console, f"{len(result['rows'])} row(s)", [str(v) for v in result["vars"]], result["rows"],
               wide=tuple(str(v) for v in result["vars"]))
    else:
        typer.echo(result["turtle"])


def register_query(query_app: typer.Typer) -> None:
    """Add `node`, `direction`, `source` and `sparql` to the `query` sub-app."""

    @query_app.command("node")
    def node_cmd(node_id: Annotated[str, typer.Argument(help="Taxonomy node id, e.g. weapons.explosives.")],
                 atlas: AtlasOpt = DEFAULT_ATLAS, as_json: JsonOpt = False,
                 nearest: Annotated[int, typer.Option(min=1, help="How many nearest nodes to list.")] = 5,
                 position: Annotated[str | None, typer.Option(help="Token position of the direction table "
                                                                   "(default: the selected one).")] = None) -> None:
        """A node's directions per layer and position, nearest nodes, clusters, cross-ablation, conditions."""
        report = q.node_report(AtlasStore.open(atlas), node_id, nearest=nearest)
        _print_json(report) if as_json else show_node(report, _console(), position)

    @query_app.command("direction")
    def direction_cmd(
        file: Annotated[Path, typer.Argument(help="Vector file: .safetensors, .npy or .pt; [d] or [layers, d].")],
        atlas: AtlasOpt = DEFAULT_ATLAS, as_json: JsonOpt = False,
        layer: Annotated[int | None, typer.Option(
            min=0, help="Compare at this layer only (default: the selected layer).")]
        = None,
        all_layers: Annotated[bool, typer.Option("--all-layers", help="Compare at every layer, best per node "
                                                                      "(the p-value pays for the search).")] = False,
        position: Annotated[str | None, typer.Option(help="Token position (default: the selected one).")] = None,
        key: Annotated[str | None, typer.Option(help="Tensor name inside a multi-tensor file.")] = None,
        method: Annotated[str, typer.Option(help="Compare with the nodes' diff_means, vs_other or residual "
                                                 "directions.")] = "diff_means",
        limit: Annotated[int, typer.Option(min=1, help="Rows to show in the table.")] = 20,
    ) -> None:
        """Which harm sources does this direction correspond to? Cosine, p-value against chance, noise floor."""
        store = AtlasStore.open(atlas)
        result = q.rank_direction(store, q.load_vector(file, key), layer=layer, position=position, method=method,
                                  source=str(file), all_layers=all_layers)
        _print_json(result) if as_json else show_ranking(result, _console(), limit)

    @query_app.command("source")
    def source_cmd(external: Annotated[str, typer.Argument(help="External category CURIE, e.g. llamaguard3:S9.")],
                   atlas: AtlasOpt = DEFAULT_ATLAS, as_json: JsonOpt = False) -> None:
        """An external category -> our nodes (crosswalks) -> their directions."""
        result = q.source_report(AtlasStore.open(atlas), external)
        _print_json(result) if as_json else show_source(result, _console())

    register_feature_query(query_app)

    @query_app.command("sparql")
    def sparql_cmd(query: Annotated[str, typer.Argument(help="SPARQL text, or a .rq/.sparql file.")],
                   atlas: AtlasOpt = DEFAULT_ATLAS, as_json: JsonOpt = False) -> None:
        """SPARQL over atlas.ttl (prefixes ra:, skos:, tax:, dpv:, airo: ... are predeclared)."""
        result = q.sparql(AtlasStore.open(atlas), query)
        _print_json(result) if as_json else show_sparql(result, _console())
