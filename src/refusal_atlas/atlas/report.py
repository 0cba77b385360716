"""report.html: one self-contained page that works offline, built from an atlas folder.

Everything is inline: plotly.js once (`plotly.offline.get_plotlyjs()`), each figure's JSON in a
`<script type="application/json">` block, PNG figures the stages wrote as base64 data URIs, the
CSS and the small bootstrap script from `templates/`. No CDN, no network.

Safety: all text that comes from the corpus, the taxonomy or the user (prompts, responses,
cluster labels, node labels, keywords) is HTML-escaped where it enters the page, including in
plotly hover text and tick labels (plotly renders a subset of HTML there); embedded JSON has
every `<`, `>` and `&` written as `\\u003c`-style escapes, so no `</script>` or `<!--` can end a
script block early.

Each section renders when its stage's output exists and shows "not run" otherwise, so the
report can be built after any prefix of the pipeline.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.atlas.store import AtlasStore, model_identity

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAX_PNG_BYTES = 1_500_000
MAX_PNG_TOTAL = 6_000_000
MAX_POINTS = 5000
MAX_TEXT = 300

METRIC_HELP = {
    "organism.heldout_refusal_rate": "held-out prompts whose policy is refuse that the organism refused",
    "organism.harmless_refusal_rate": "harmless held-out prompts refused (over-refusal)",
    "organism.permitted_compliance_rate": "held-out prompts a condition permits that were answered",
    "detector.f1": "refusal detector F1 on the human-labelled refusals",
    "clusters.seed_ari": "agreement of clusterings across seeds (ARI)",
    "clusters.node_ari": "agreement of clusters with taxonomy nodes (ARI)",
    "directions.median_noise_floor": "median split-half cosine of the node directions",
    "ablation.refusal_before": "refusal rate on held-out harmful prompts, no intervention",
    "ablation.refusal_after": "the same with the pooled refusal direction ablated",
    "ablation.harmless_kl": "KL caused by that ablation on the harmless prompts the model answers (capability cost)",
    "steering.induced_refusal_rate": "harmless prompts refused when the pooled direction is added",
}


# ------------------------------------------------------------------------------------ escaping
def esc(value: Any) -> str:
    """HTML-escape anything (quotes too, so it is safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def script_json(obj: Any) -> str:
    """JSON safe inside <script>: `<`, `>`, `&` and the JS line separators become \\u escapes."""
    from plotly.utils import PlotlyJSONEncoder

    text = json.dumps(obj, cls=PlotlyJSONEncoder, ensure_ascii=False, allow_nan=False, default=str)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def short(text: Any, limit: int = MAX_TEXT) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def hover(text: Any, limit: int = MAX_TEXT, width: int = 80) -> str:
    """Escaped hover text, wrapped with <br> (the only markup we add ourselves)."""
    s = short(text, limit)
    lines = [s[i : i + width] for i in range(0, len(s), width)] or [""]
    return "<br>".join(esc(line) for line in lines)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "–" if math.isnan(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, max_rows: int = 500) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        if i >= max_rows:
            body.append(f"<tr><td colspan='{len(columns)}' class='small'>… more rows in the data files</td></tr>")
            break
        cells = []
        for v in row:
            numeric = isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
            cells.append(f"<td class='num'>{esc(_fmt(v))}</td>" if numeric else f"<td>{esc(short(_fmt(v)))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='tablewrap'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def df_table(df: pd.DataFrame, columns: Sequence[str] | None = None, max_rows: int = 500) -> str:
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    return html_table(cols, df[cols].itertuples(index=False, name=None), max_rows=max_rows)


def not_run(what: str, how: str = "refusal-atlas run") -> str:
    return f"<p class='notrun'>not run: no {esc(what)} in this atlas (produced by <code>{esc(how)}</code>)</p>"


# ------------------------------------------------------------------------------------ figures
class Figures:
    """Collects plotly figures as JSON blocks and returns their container divs."""

    def __init__(self) -> None:
        self.blocks: list[str] = []

    def add(self, fig: Any, height: int = 480) -> str:
        n = len(self.blocks)
        spec = fig.to_plotly_json()
        spec["layout"].pop("template", None)  # the default template is large; plotly applies its own
        spec["layout"].setdefault("height", height)
        self.blocks.append(f"<script type='application/json' id='fig-data-{n}'>{script_json(spec)}</script>")
        return f"<div class='figure' id='fig-{n}' data-fig='fig-data-{n}' style='min-height:{height}px'></div>"


def _go():
    import plotly.graph_objects as go

    return go


# ------------------------------------------------------------------------------------ sections
Section = tuple[str, str, str, str]  # (anchor, title, how-to-read, body html)


def _section_metrics(store: AtlasStore) -> str:
    flat = _flatten(store.metrics)
    if not flat:
        return not_run("metrics.json")
    cards = []
    for key, value in flat.items():
        if isinstance(value, dict | list):
            continue
        help_text = METRIC_HELP.get(key, "")
        cards.append(f"<div class='metric' title='{esc(help_text)}'><div class='v'>{esc(_fmt(value))}</div>"
                     f"<div class='k'>{esc(key)}</div><div class='small'>{esc(help_text)}</div></div>")
    return f"<div class='metrics'>{''.join(cards)}</div>"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def _badge(text: str) -> str:
    return f"<span class='badge b-{esc(text)}'>{esc(text.replace('_', ' '))}</span>"


def _section_taxonomy(store: AtlasStore) -> str:
    tax = store.taxonomy
    if tax is None:
        return not_run("taxonomy.ttl", "refusal-atlas run (or ontology export)")
    from refusal_atlas.taxonomy.resolve import default_behaviour
    from refusal_atlas.taxonomy.resolve import format_when as fmt_when

    rel = _node_reliability(store)
    seen: set[str] = set()

    def item(node_id: str) -> str:
        node = tax.nodes[node_id]
        parts = [f"<b>{esc(node.label)}</b> <code>{esc(node_id)}</code>",
                 _badge(default_behaviour(tax, node_id).value)]
        if node.status.value != "accepted":
            parts.append(_badge(node.status.value))
        if node_id in rel:
            parts.append(f" <span class='small'>direction reliability {esc(_fmt(rel[node_id]))}</span>")
        rules = "".join(f"<div>when {esc(fmt_when(r.when))} → {_badge(r.expect.value)}"
                        f"{' — ' + esc(r.rationale) if r.rationale else ''}</div>" for r in node.conditions)
        kids = "" if node_id in seen else "".join(item(c.id) for c in tax.children(node_id))
        seen.add(node_id)
        inner = f"<ul>{kids}</ul>" if kids else ""
        rules_html = f"<div class='rules'>{rules}</div>" if rules else ""
        return f"<li>{''.join(parts)}{rules_html}{inner}</li>"

    tree = "".join(item(r.id) for r in tax.roots())
    n_cond = sum(1 for n in tax.nodes.values() if n.conditions)
    return (f"<p class='small'>{esc(tax.scheme.title)} {esc(tax.scheme.version)}: {len(tax.nodes)} nodes, "
            f"{n_cond} with condition rules.</p><ul class='tree'>{tree}</ul>")


def _node_reliability(store: AtlasStore) -> dict[str, float]:
    dm = store.direction_metrics
    if dm is None or "reliability" not in dm.columns:
        return {}
    best = dm.dropna(subset=["reliability"]).groupby("node")["reliability"].max()
    return {str(k): float(v) for k, v in best.items()}


def _section_organism(store: AtlasStore, figs: Figures) -> str:
    org, held = store.organism, store.adherence
    if org is None and held is None:
        return not_run("organism", "refusal-atlas organism build (run does it for --model default)")
    parts = []
    metrics = (org or {}).get("metrics") or {}
    if metrics:
        rows = [(k, v) for k, v in metrics.items() if not isinstance(v, dict | list)]
        parts.append(html_table(["metric", "value"], rows))
    if held is not None and not held.empty and {"category", "refused"} <= set(held.columns):
        go = _go()
        rates = held.groupby("category")["refused"].agg(["mean", "size"]).reset_index()
        fig = go.Figure(go.Bar(x=[esc(c) for c in rates["category"]], y=rates["mean"],
                               text=[f"n={n}" for n in rates["size"]], textposition="outside",
                               marker_color="#6b8fb5"))
        fig.update_layout(title="Held-out refusal rate by policy category", yaxis_title="refusal rate",
                          yaxis_range=[0, 1.1], margin={"t": 50})
        parts.append(figs.add(fig, 360))
    by_node = store.adherence_by_node
    if by_node is not None and not by_node.empty:
        parts.append("<h3>Adherence per node and condition</h3>" +
                     df_table(by_node, ["node", "condition", "expected", "category", "n", "refusal_rate",
                                        "adherence"]))
    if held is not None and not held.empty and "response" in held.columns:
        by = "category" if "category" in held.columns else None
        sample = held.groupby(by, sort=True).head(3) if by else held.head(12)
        parts.append("<h3>Examples of held-out responses</h3>" +
                     df_table(sample, ["node", "condition", "expected", "prompt", "response", "refused"]))
    return "".join(parts)


def _cluster_view_html(store: AtlasStore, view, figs: Figures, title: str, mapped: bool) -> str:
    clusters, assign = view.clusters, view.assignments
    parts = []
    labels = {c.id: c.label or f"cluster {c.id}" for c in clusters}
    if assign is not None and {"x", "y", "cluster"} <= set(assign.columns):
        go = _go()
        data = assign.head(MAX_POINTS)
        text_col = next((c for c in ("text", "response", "prompt", "document") if c in data.columns), None)
        fig = go.Figure()
        for cid, rows in data.groupby("cluster", sort=True):
            name = short(labels.get(str(cid), f"cluster {cid}"), 60)
            texts = [hover(t) for t in rows[text_col]] if text_col else None
            fig.add_trace(go.Scatter(
                x=rows["x"], y=rows["y"], mode="markers", name=esc(name), hovertext=texts,
                hoverinfo="text+name" if texts else "name",
                marker={"size": 6, "opacity": 0.75, "color": "#b0b7bf" if str(cid) in ("-1", "outlier") else None},
            ))
        fig.update_layout(title=esc(title), xaxis_title="map x", yaxis_title="map y", legend={"font": {"size": 10}})
        parts.append(figs.add(fig, 520))
    if clusters:
        rows = []
        for c in clusters:
            best = ", ".join(f"{n} ({_fmt(s)})" for n, s in c.best_nodes[:3])
            if c.outlier:
                best = "outliers"
            elif c.fits is False:
                best = f"fits no node (closest: {best or '–'})"
            row = [c.id, c.label, c.size, ", ".join(c.keywords[:8])]
            row += [best or "–", c.method or "–"] if mapped else []
            rows.append([*row, c.stability, c.examples[0] if c.examples else ""])
        columns = ["cluster", "label", "size", "keywords"]
        columns += ["best node(s) (score)", "mapped by"] if mapped else []
        parts.append(html_table([*columns, "stability (seed Jaccard)", "example"], rows))
    shown = {k: v for k, v in view.metrics.items()
             if not k.endswith((".min", ".max", ".pairs")) and not k.startswith("stability.")}
    if shown:
        parts.append(html_table(["clustering metric", "value"], list(shown.items())))
    if view.proposals_file is not None:
        parts.append(f"<p>Proposed nodes for clusters that fit no node: <code>"
                     f"{esc(view.proposals_file.relative_to(store.root))}</code> "
                     "(review with <code>refusal-atlas taxonomy accept</code>).</p>")
    return "".join(parts)


def _section_clusters(store: AtlasStore, figs: Figures) -> str:
    main, responses = store.cluster_view, store.response_cluster_view
    if not main.exists() and not responses.exists():
        return not_run("clusters", "refusal-atlas curate cluster / map")
    parts = []
    if main.exists():
        column = _text_column(main.folder)
        parts.append(_cluster_view_html(store, main, figs, f"Cluster map of the corpus ({column})", mapped=True))
    if responses.exists():
        parts.append("<h3>Refusal wordings</h3><p class='small'>The responses the detector calls refusals, "
                     "clustered: how many distinct ways does the model refuse?</p>")
        parts.append(_cluster_view_html(store, responses, figs, "Cluster map of the refusals (responses)",
                                        mapped=False))
    return "".join(parts)


def _text_column(folder: Path) -> str:
    try:
        meta = json.loads((folder / "clusters.json").read_text(encoding="utf-8"))
        return str((meta.get("input") or {}).get("text_column") or "texts")
    except (OSError, ValueError, AttributeError):
        return "texts"


def _heatmap_setup(store: AtlasStore) -> tuple[Any, list[str], Any, int] | None:
    ds = store.directions
    if ds is None:
        return None
    from refusal_atlas.lm.positions import canonical_position

    ov = store.overlap_json
    pos = ov.get("position")
    try:
        pos = canonical_position(pos) if pos is not None else (ds.meta.get("roles") or {}).get("refusal", -1)
    except Exception:  # an unexpected label in overlap.json: fall back to the refusal position
        pos = -1
    if pos not in ds.positions:
        pos = ds.positions[0]
    layer = ov.get("layer")
    if layer not in ds.layers:
        rel = ds.noise.get("diff_means/reliability")
        if rel is not None:
            k = ds.position_index(pos)
            med = np.nanmedian(rel[: len(ds.nodes), :, k].numpy(), axis=0)
            layer = ds.layers[int(np.nanargmax(med))] if not np.isnan(med).all() else ds.layers[len(ds.layers) // 2]
        else:
            layer = ds.layers[len(ds.layers) // 2]
    return ds, list(ds.nodes), pos, int(layer)


def _cos_matrix(ds, nodes: list[str], layer: int, pos) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Raw cosines [K, K], CI [K, K, 2] and the permutation null [K, K] where the noise stage stored them."""
    j, k = ds.layer_index(layer), ds.position_index(pos)
    idx = [ds.node_index(n) for n in nodes]
    cos = ds.noise.get("diff_means/cos")
    if cos is not None:
        mat = cos[idx][:, idx, j, k].numpy()
    else:
        units = np.stack([ds.unit(n, layer, pos).numpy() for n in nodes])
        mat = units @ units.T
    ci = ds.noise.get("diff_means/cos_ci")
    null = ds.noise.get("diff_means/cos_null95")
    return (mat, ci[idx][:, idx, j, k].numpy() if ci is not None else None,
            null[idx][:, idx, j, k].numpy() if null is not None else None)


def _section_heatmap(store: AtlasStore, figs: Figures) -> str:
    setup = _heatmap_setup(store)
    if setup is None:
        return not_run("directions", "refusal-atlas directions extract")
    ds, nodes, pos, layer0 = setup
    from refusal_atlas.lm.positions import position_label

    go = _go()
    dm = store.direction_metrics
    labels = [esc(short(store.node_label(n), 40)) for n in nodes]
    traces = []
    for layer in ds.layers:
        mat, ci, null = _cos_matrix(ds, nodes, layer, pos)
        floors = []
        for n in nodes:
            hit = dm[(dm["node"] == n) & (dm["layer"] == layer) & (dm["position"] == position_label(pos))]
            floors.append(hit.iloc[0]["noise_floor"] if not hit.empty else None)
        z = mat.copy()
        text = []
        for a in range(len(nodes)):
            row = []
            for b in range(len(nodes)):
                if a == b:
                    z[a, b] = floors[a] if floors[a] is not None else np.nan
                    row.append(f"{esc(nodes[a])}<br>noise floor (split-half cosine) {_fmt(floors[a])}")
                    continue
                extra = f"<br>95% CI [{_fmt(ci[a, b, 0])}, {_fmt(ci[a, b, 1])}]" if ci is not None else ""
                extra += f"<br>null 95th pct {_fmt(null[a, b])}" if null is not None else ""
                row.append(f"{esc(nodes[a])} × {esc(nodes[b])}<br>cosine {_fmt(mat[a, b])}{extra}"
                           f"<br>floors {_fmt(floors[a])} / {_fmt(floors[b])}")
            text.append(row)
        traces.append(go.Heatmap(z=np.where(np.isnan(z), None, z).tolist(), x=labels, y=labels, text=text,
                                 hoverinfo="text", zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                                 visible=layer == layer0, colorbar={"title": "cosine"}))
    fig = go.Figure(traces)
    buttons = [{"label": f"layer {layer}", "method": "update",
                "args": [{"visible": [m == i for m in range(len(ds.layers))]},
                         {"title": f"Cosine between node directions, layer {layer}, position {position_label(pos)}"}]}
               for i, layer in enumerate(ds.layers)]
    fig.update_layout(title=f"Cosine between node directions, layer {layer0}, position {position_label(pos)}",
                      updatemenus=[{"buttons": buttons, "active": ds.layers.index(layer0), "x": 1.0, "y": 1.15}],
                      yaxis={"autorange": "reversed"}, margin={"l": 160, "b": 140})
    height = max(480, 28 * len(nodes) + 220)
    return figs.add(fig, height)


def _section_overlap(store: AtlasStore, figs: Figures) -> str:
    g = store.overlap_graph
    if g is None:
        return not_run("overlap graph", "refusal-atlas directions overlap")
    import networkx as nx

    go = _go()
    parts = []
    overlap, taxonomy = store.overlap_edges("overlap"), store.overlap_edges("taxonomy")
    if g.number_of_nodes():
        simple = nx.Graph()
        simple.add_nodes_from(g.nodes)
        simple.add_weighted_edges_from((a, b, max(float(d.get("weight", 0) or 0), 0.01)) for a, b, d in overlap)
        pos = nx.spring_layout(simple, seed=0, weight="weight") if overlap else nx.circular_layout(simple)
        traces = []
        for edges, colour, dash, name in ((taxonomy, "#d5dbe1", "dot", "taxonomy parent link"),
                                          (overlap, "#6b8fb5", "solid", "overlap beyond noise")):
            xs, ys = [], []
            for a, b, _ in edges:
                xs += [pos[a][0], pos[b][0], None]
                ys += [pos[a][1], pos[b][1], None]
            if xs:
                traces.append(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": 2, "dash": dash},
                                         hoverinfo="skip", name=name))
        mid_x, mid_y, mid_text = [], [], []
        for a, b, data in overlap:
            mid_x.append((pos[a][0] + pos[b][0]) / 2)
            mid_y.append((pos[a][1] + pos[b][1]) / 2)
            w = data.get("weight", data.get("cosine"))
            ci = f" [{_fmt(data.get('ci_low'))}, {_fmt(data.get('ci_high'))}]" if "ci_low" in data else ""
            floors = (f"<br>floors {_fmt(data.get('floor_a'))} / {_fmt(data.get('floor_b'))}"
                      if "floor_a" in data else "")
            mid_text.append(f"{esc(a)} – {esc(b)}<br>cosine {_fmt(w)}{esc(ci)}{floors}")
        if mid_x:
            traces.append(go.Scatter(x=mid_x, y=mid_y, mode="markers", hovertext=mid_text, hoverinfo="text",
                                     marker={"size": 7, "color": "#6b8fb5", "opacity": 0.5}, showlegend=False))
        node_text = []
        for n, data in g.nodes(data=True):
            info = "<br>".join(f"{esc(k)}: {esc(_fmt(v))}" for k, v in data.items() if k != "label")
            node_text.append(f"<b>{esc(data.get('label', store.node_label(n)))}</b><br>{esc(n)}<br>{info}")
        traces.append(go.Scatter(x=[pos[n][0] for n in g.nodes], y=[pos[n][1] for n in g.nodes],
                                 mode="markers+text", text=[esc(short(n, 30)) for n in g.nodes],
                                 textposition="top center", hovertext=node_text, hoverinfo="text",
                                 marker={"size": 14, "color": "#243447"}, showlegend=False))
        fig = go.Figure(traces)
        where = f" (layer {g.graph.get('layer')}, position {g.graph.get('position')})" if g.graph else ""
        fig.update_layout(title=esc(f"Overlap graph{where}"), xaxis={"visible": False}, yaxis={"visible": False})
        parts.append(figs.add(fig, 520))
        edges = sorted(overlap, key=lambda e: -float(e[2].get("weight", 0) or 0))
        parts.append(html_table(["node a", "node b", "cosine", "CI low", "CI high", "floor a", "floor b",
                                 "null 95%", "distinct"],
                                [[a, b, d.get("weight"), d.get("ci_low"), d.get("ci_high"), d.get("floor_a"),
                                  d.get("floor_b"), d.get("null95"), d.get("distinct")] for a, b, d in edges[:100]])
                     if edges else "<p>No pair of nodes overlaps beyond its noise at this layer.</p>")
    ov = store.overlap_json
    scalars = {k: v for k, v in ov.items() if isinstance(v, int | float | str | bool)}
    for key, value in (ov.get("sibling_test") or {}).items() if isinstance(ov.get("sibling_test"), dict) else []:
        if isinstance(value, int | float | str | bool):
            scalars[f"sibling_test.{key}"] = value
    if scalars:
        parts.append(html_table(["overlap statistic", "value"], list(scalars.items())))
    return "".join(parts) or "<p>The overlap graph is empty.</p>"


def _section_profiles(store: AtlasStore, figs: Figures) -> str:
    dm = store.direction_metrics
    if dm is None:
        return not_run("directions", "refusal-atlas directions extract")
    go = _go()
    from plotly.subplots import make_subplots

    setup = _heatmap_setup(store)
    pos = str(setup[2]) if setup else str(dm["position"].iloc[0])
    data = dm[dm["position"] == pos]
    metrics = [c for c in ("reliability", "norm", "auroc") if c in data.columns and data[c].notna().any()]
    probe = store.probe_accuracy
    if probe is not None and probe["probe_accuracy"].notna().any():
        probe = probe[probe["position"] == pos] if (probe["position"] == pos).any() else probe
    else:
        probe = None
    titles = {"reliability": "reliability (split-half, corrected)", "norm": "norm of the mean difference",
              "auroc": "AUROC node vs harmless (held out)"}
    panels = [titles[m] for m in metrics] + (["probe accuracy for node identity (all nodes)"] if probe is not None
                                             else [])
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.07)
    from plotly.colors import qualitative

    palette = qualitative.Plotly + qualitative.D3
    for n_i, (node, rows) in enumerate(data.groupby("node", sort=True)):
        rows = rows.sort_values("layer")
        name = esc(short(store.node_label(str(node)) if node != "@pooled" else "pooled", 40))
        line = {"color": "#555" if node == "@pooled" else palette[n_i % len(palette)],
                "dash": "dash" if node == "@pooled" else "solid"}
        for i, m in enumerate(metrics, start=1):
            fig.add_trace(go.Scatter(x=rows["layer"], y=rows[m], mode="lines+markers", name=name,
                                     legendgroup=esc(node), showlegend=i == 1, line=line), row=i, col=1)
    if probe is not None:
        row_i = len(panels)
        for ppos, rows in probe.groupby("position"):
            rows = rows.sort_values("layer")
            fig.add_trace(go.Scatter(x=rows["layer"], y=rows["probe_accuracy"], mode="lines+markers",
                                     name=esc(f"probe accuracy (position {ppos})"),
                                     line={"color": "black", "width": 3}), row=row_i, col=1)
            chance = rows["chance"].dropna()
            if not chance.empty:
                fig.add_trace(go.Scatter(x=rows["layer"], y=[float(chance.iloc[0])] * len(rows), mode="lines",
                                         name="probe chance", line={"color": "gray", "dash": "dot"}),
                              row=row_i, col=1)
    fig.update_layout(title=f"Layer profiles (position {esc(pos)})", legend={"font": {"size": 10}})
    fig.update_xaxes(title_text="layer", row=len(panels), col=1)
    return figs.add(fig, 240 * len(panels) + 120)


def _section_causal(store: AtlasStore, figs: Figures) -> str:
    xa, steer = store.cross_ablation, store.steering
    if xa is None and steer is None:
        return not_run("causal tests", "refusal-atlas directions cross-ablate / steer")
    go = _go()
    parts = []
    sel = store.selection
    if sel is not None and "selected" in sel.columns:
        chosen = sel[sel["selected"].astype(bool)]
        if not chosen.empty:
            parts.append("<h3>Selected direction per node</h3><p class='small'>Chosen as Arditi et al. do: the "
                         "lowest bypass score (refusal log-odds with the direction ablated) among candidates "
                         "that induce refusal when added, cost little KL, and sit below 0.8 of the depth.</p>" +
                         df_table(chosen, ["node", "layer", "position", "bypass_score", "induce_score", "kl_score",
                                           "filtered"]))
    if xa is not None and {"ablated", "evaluated", "refusal_rate"} <= set(xa.columns):
        d = xa.copy()
        method = d["method"].astype(str) if "method" in d.columns else pd.Series("diff_means", index=d.index)
        d["row"] = [a if m in ("diff_means", "none", "nan") else f"{a} [{m}]"
                    for a, m in zip(d["ablated"].astype(str), method, strict=True)]
        order = sorted(d["row"].unique(), key=lambda r: (r != "none", r != "@pooled", "[" in r, r))
        piv = d.pivot_table(index="row", columns="evaluated", values="refusal_rate", aggfunc="mean").reindex(order)
        text = [[f"ablate {esc(a)}<br>on {esc(e)} prompts<br>refusal {_fmt(piv.loc[a, e])}" for e in piv.columns]
                for a in piv.index]
        measure = str(d["refusal_measure"].iloc[0]) if "refusal_measure" in d.columns else "refusal rate"
        fig = go.Figure(go.Heatmap(z=np.where(piv.isna(), None, piv.values).tolist(),
                                   x=[esc(short(c, 40)) for c in piv.columns],
                                   y=[esc(short(r, 50)) for r in piv.index], text=text, hoverinfo="text",
                                   zmin=0, zmax=1, colorscale="Viridis", colorbar={"title": "refusal"}))
        fig.update_layout(title=esc(f"Cross-ablation: {measure} on each node's prompts (columns) with a direction "
                                    "ablated (rows; none = no ablation)"), xaxis_title="evaluated on",
                          yaxis_title="ablated direction", yaxis={"autorange": "reversed"},
                          margin={"l": 200, "b": 140})
        parts.append(figs.add(fig, max(420, 28 * len(piv.index) + 220)))
        own = d["ablated"].astype(str) == d["evaluated"].astype(str)
        d["own"] = np.where(own, d["refusal_rate"], np.nan)
        d["others"] = np.where(~own, d["refusal_rate"], np.nan)
        agg = {"own": ("own", "mean"), "others": ("others", "mean"), "all": ("refusal_rate", "mean")}
        if "harmless_kl" in d.columns:
            agg["harmless_kl"] = ("harmless_kl", "mean")
        summary = d.groupby("row", sort=False).agg(**agg).reindex(order).reset_index()
        parts.append("<p class='small'>Per ablated direction: mean refusal on its own node's prompts, on the "
                     "other nodes' prompts, overall, and the KL it costs on harmless prompts.</p>" + df_table(summary))
    elif xa is not None:
        parts.append(df_table(xa))
    if steer is not None and {"node", "layer", "induced_refusal_rate"} <= set(steer.columns):
        fig = go.Figure()
        for node, rows in steer.groupby("node", sort=True):
            rows = rows.sort_values("layer")
            fig.add_trace(go.Scatter(x=rows["layer"], y=rows["induced_refusal_rate"], mode="lines+markers",
                                     name=esc(short(node, 40))))
        fig.update_layout(title="Steering: refusal induced on harmless prompts by adding a node's direction",
                          xaxis_title="layer", yaxis_title="induced refusal rate", yaxis_range=[0, 1.05])
        parts.append(figs.add(fig, 420))
    elif steer is not None:
        parts.append(df_table(steer))
    wording = store.wording
    if wording is not None:
        parts.append("<h3>Wording vs detection</h3>")
        if "layer" in wording.columns and {"probe_accuracy", "refusal_token_z_mean"} & set(wording.columns):
            from plotly.subplots import make_subplots

            fig = make_subplots(specs=[[{"secondary_y": True}]])
            w = wording.sort_values("layer")
            if "probe_accuracy" in w.columns:
                fig.add_trace(go.Scatter(x=w["layer"], y=w["probe_accuracy"], mode="lines+markers",
                                         name="detection: probe accuracy for node identity"), secondary_y=False)
            if "probe_chance" in w.columns:
                fig.add_trace(go.Scatter(x=w["layer"], y=w["probe_chance"], mode="lines", name="probe chance",
                                         line={"dash": "dot", "color": "gray"}), secondary_y=False)
            for col, name in (("refusal_token_z_mean", "wording: refusal-token promotion (mean over nodes, z)"),
                              ("pooled_refusal_token_z", "wording: pooled direction (z)"),
                              ("own_wording_z_mean", "wording: own node-specific wording (z)")):
                if col in w.columns and w[col].notna().any():
                    fig.add_trace(go.Scatter(x=w["layer"], y=w[col], mode="lines+markers", name=name,
                                             line={"dash": "dash"}), secondary_y=True)
            fig.update_layout(title="Where is the category detected, where is the refusal worded?",
                              xaxis_title="layer", legend={"font": {"size": 10}})
            fig.update_yaxes(title_text="probe accuracy", secondary_y=False)
            fig.update_yaxes(title_text="logit-lens z-score", secondary_y=True)
            parts.append(figs.add(fig, 420))
        parts.append(df_table(wording, max_rows=200))
    return "".join(parts)


def _section_conditions(store: AtlasStore, figs: Figures) -> str:
    ct = store.condition_table
    if ct is not None:
        cols = ["node", "condition", "expected", "n", "refusal_rate", "ci_low", "ci_high", "projection"]
        cols += [c for c in ct.columns if c not in cols]
        parts = [df_table(ct, cols)]
        if {"node", "condition", "refusal_rate"} <= set(ct.columns):
            from plotly.subplots import make_subplots

            go = _go()
            d = ct.copy()
            d["condition"] = d["condition"].fillna("").replace("", "(none)")
            x = [f"{esc(n)}<br>{esc(c)}" for n, c in zip(d["node"], d["condition"], strict=True)]
            panels = [("refusal_rate", "ci_low", "ci_high", "refusal rate", "#ca6f1e")]
            if "projection" in d.columns and d["projection"].notna().any():
                panels.append(("projection", "projection_ci_low", "projection_ci_high",
                               "projection on the node's direction", "#6b8fb5"))
            fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.1,
                                subplot_titles=[p[3] + " (95% CI)" for p in panels])
            for i, (col, lo, hi, _, colour) in enumerate(panels, start=1):
                err = None
                if {lo, hi} <= set(d.columns):
                    err = {"type": "data", "symmetric": False, "array": (d[hi] - d[col]).tolist(),
                           "arrayminus": (d[col] - d[lo]).tolist()}
                fig.add_trace(go.Bar(x=x, y=d[col], error_y=err, marker_color=colour, showlegend=False),
                              row=i, col=1)
            fig.update_layout(title="Does a condition change the representation, or only the output?")
            parts.append(figs.add(fig, 300 * len(panels) + 140))
        return "".join(parts)
    by_node = store.adherence_by_node
    if by_node is not None and "condition" in by_node.columns:
        conditional = by_node[by_node["condition"].fillna("").astype(str) != ""]
        if not conditional.empty:
            return ("<p class='small'>The causal condition experiment did not run; these are the organism's "
                    "held-out refusal rates per condition.</p>" + df_table(conditional))
    return not_run("condition table", "refusal-atlas directions conditions (run does it)")


def _section_figures(store: AtlasStore) -> str:
    imgs, total = [], 0
    for path in store.figures():
        size = path.stat().st_size
        if size > MAX_PNG_BYTES or total + size > MAX_PNG_TOTAL:
            imgs.append(f"<p class='small'>{esc(path.relative_to(store.root))} not embedded "
                        f"({size // 1024} KiB); open it beside the report.</p>")
            continue
        total += size
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        rel = esc(path.relative_to(store.root))
        imgs.append(f"<figure><img class='fig' alt='{rel}' src='data:image/png;base64,{data}'>"
                    f"<figcaption class='small'>{rel}</figcaption></figure>")
    return "".join(imgs) or "<p class='small'>No PNG figures were written by the stages.</p>"


def _section_provenance(store: AtlasStore) -> str:
    man, records = store.manifest, store.stage_records
    if not man and not records:
        return not_run("manifest.json")
    parts = []
    if records:
        parts.append("<h3>Stages</h3>" + html_table(
            ["stage", "seconds (when run)", "cache key"],
            [(name, rec.get("seconds"), rec.get("key")) for name, rec in records.items()]))
    if man:
        flat = _flatten(man)
        rows = [(k, json.dumps(v) if isinstance(v, list) else v) for k, v in flat.items()]
        parts.append("<h3>Manifest</h3>" + html_table(["key", "value"], rows, max_rows=300))
    return "".join(parts)


HOW = {
    "metrics": "The headline numbers of this run (metrics.json). Organism rates say whether the model organism "
               "follows the taxonomy's policy; ablation and steering rates say whether the extracted pooled "
               "direction is necessary and sufficient for refusal.",
    "taxonomy": "The harm-source taxonomy the atlas was built from. Each node shows its default expected "
                "behaviour (inherited from the parent when not stated) and its condition rules: when the stated "
                "context holds, the expected behaviour changes. The reliability is the best split-half "
                "reliability of the node's direction across layers.",
    "organism": "The model organism was fine-tuned to follow the taxonomy's conditional policy; here is how it "
                "behaves on held-out prompts it never saw. Refusal should be high where the policy says refuse, "
                "low on harmless prompts and where a condition permits answering.",
    "clusters": "Bottom-up: the corpus embedded and clustered (consensus over seeds). Each point is one text "
                "(hover to read it); the table gives each cluster's best-matching taxonomy node with its score "
                "(label majority where rows carry nodes, similarity to node definitions otherwise). Clusters "
                "that fit no node are written as proposed nodes. Seed ARI near 1 means the clustering is stable; "
                "node ARI says how far bottom-up clusters agree with the top-down taxonomy.",
    "heatmap": "Cosine similarity between the refusal directions of every pair of nodes at one layer (use the "
               "menu to change layer). The diagonal is each node's noise floor: the cosine between directions "
               "from two random halves of its own prompts. A between-node cosine close to both nodes' floors "
               "means the two are indistinguishable given the data; well below them means they differ.",
    "overlap": "Nodes are taxonomy nodes; an edge means their directions overlap significantly more than their "
               "noise floors and the permutation null predict (edge weight = cosine, with its confidence "
               "interval). Compare with the taxonomy: siblings that are not connected have separable mechanisms.",
    "profiles": "Per node and layer: reliability (split-half, Spearman–Brown corrected), the direction's norm "
                "(how far the node's prompts sit from harmless ones), and where available the AUROC of separating "
                "the node from harmless prompts. Detection usually rises in middle layers.",
    "causal": "Ablating one node's direction and measuring refusal on every node's prompts: a row that drops "
              "refusal everywhere is a shared mechanism; a drop on the diagonal only is node-specific. Rows marked "
              "[residual] ablate what is left of a node's direction once the pooled direction is projected out. "
              "Steering adds a direction to harmless prompts: a high induced rate means the direction suffices "
              "for refusal. Wording vs detection: a probe's accuracy for telling nodes apart (detection) against "
              "how strongly directions promote refusal-opening tokens through the logit lens (wording), by layer.",
    "conditions": "For nodes with condition rules: refusal rate under each condition value with its confidence "
                  "interval and, where measured, the projection onto the node's direction. A changed refusal "
                  "with an unchanged projection means the condition acts after detection (on the output).",
    "figures": "Static figures written by the stages, embedded as images.",
    "provenance": "Versions, seeds, parameters and timings of the run (manifest.json).",
}


def build_sections(store: AtlasStore, figs: Figures) -> list[Section]:
    def guarded(fn: Callable[[], str], what: str) -> str:
        try:
            return fn()
        except Exception as exc:  # one bad artefact must not take the whole report down
            return f"<p class='notrun'>could not render {esc(what)}: {esc(type(exc).__name__)}: {esc(exc)}</p>"

    spec = [
        ("metrics", "Headline metrics", lambda: _section_metrics(store)),
        ("taxonomy", "Taxonomy tree with conditions", lambda: _section_taxonomy(store)),
        ("organism", "Model organism: adherence to the policy", lambda: _section_organism(store, figs)),
        ("clusters", "Cluster map", lambda: _section_clusters(store, figs)),
        ("heatmap", "Cosine heatmap with noise floors", lambda: _section_heatmap(store, figs)),
        ("overlap", "Overlap graph", lambda: _section_overlap(store, figs)),
        ("profiles", "Layer profiles", lambda: _section_profiles(store, figs)),
        ("causal", "Cross-ablation matrix and steering", lambda: _section_causal(store, figs)),
        ("conditions", "Condition table", lambda: _section_conditions(store, figs)),
        ("figures", "Stage figures", lambda: _section_figures(store)),
        ("provenance", "Provenance", lambda: _section_provenance(store)),
    ]
    return [(anchor, title, HOW[anchor], guarded(fn, title)) for anchor, title, fn in spec]


def render_html(store: AtlasStore) -> str:
    """The whole report as one HTML string."""
    from plotly.offline import get_plotlyjs

    figs = Figures()
    sections = build_sections(store, figs)
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    boot = (TEMPLATES / "report.js").read_text(encoding="utf-8")
    model = model_identity(store.directions_meta, store.manifest)[0] if store.directions_meta else \
        str(store.manifest.get("model") or "unknown model")
    created = store.manifest.get("created_at") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    nav = "".join(f"<a href='#{a}'>{esc(t)}</a>" for a, t, _, _ in sections)
    body = "".join(
        f"<section id='{a}'><h2>{esc(t)}</h2><p class='how'><b>How to read this.</b> {esc(how)}</p>{content}</section>"
        for a, t, how, content in sections
    )
    plotly_js = get_plotlyjs() if figs.blocks else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline' 'unsafe-eval'; font-src data:\">"
        f"<title>refusal-atlas report: {esc(model)}</title><style>{css}</style></head><body>"
        f"<header><h1>refusal-atlas</h1><p>Which refusal mechanisms correspond to which sources of harm in "
        f"<b>{esc(model)}</b> — atlas <code>{esc(store.root.name)}</code>, {esc(created)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main>"
        + (f"<script>{plotly_js}</script>" if plotly_js else "")
        + "".join(figs.blocks)
        + f"<script>{boot}</script></body></html>"
    )


def build_report(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write `<out>/report.html` (or `path`) atomically and return its path."""
    store = AtlasStore.open(out_dir)
    target = Path(path) if path is not None else store.root / "report.html"
    text = render_html(store)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target
