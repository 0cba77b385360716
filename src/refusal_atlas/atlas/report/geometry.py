"""Report sections about the directions' geometry: cosine heatmap, overlap graph, layer profiles.

The figures open at one layer and position for the whole report: the causally selected one
(the pooled direction's selection, else the layer most nodes selected), else the overlap stage's,
else the layer where the median reliability peaks.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from refusal_atlas.atlas.query.common import POOLED, selected_layer_position
from refusal_atlas.atlas.report.html import Figures, ci_text, esc, fmt, html_table, none_for_nan, not_run, short
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.lm.positions import Position, canonical_position, position_label
from refusal_atlas.mechinterp.directions import DirectionSet


def figure_setup(store: AtlasStore) -> tuple[DirectionSet, list[str], Position, int] | None:
    """The direction set, its nodes, and the position and layer the figures open at."""
    ds = store.directions
    if ds is None:
        return None
    chosen = selected_layer_position(store)
    ov = store.overlap_json
    raw = chosen[1] if chosen else ov.get("position")
    try:
        pos = canonical_position(raw) if raw is not None else (ds.meta.get("roles") or {}).get("refusal", -1)
    except Exception:  # an unexpected label in a stage file: fall back to the refusal position
        pos = -1
    if pos not in ds.positions:
        pos = ds.positions[0]
    layer: Any = chosen[0] if chosen else ov.get("layer")
    if layer not in ds.layers:
        rel = ds.noise.get("diff_means/reliability")
        if rel is not None:
            k = ds.position_index(pos)
            med = np.nanmedian(rel[: len(ds.nodes), :, k].numpy(), axis=0)
            layer = ds.layers[int(np.nanargmax(med))] if not np.isnan(med).all() else ds.layers[len(ds.layers) // 2]
        else:
            layer = ds.layers[len(ds.layers) // 2]
    return ds, list(ds.nodes), pos, int(layer)


def _cos_matrix(ds: DirectionSet, nodes: list[str], layer: int,
                pos: Position) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
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


def section_heatmap(store: AtlasStore, figs: Figures) -> str:
    setup = figure_setup(store)
    dm = store.direction_metrics
    if setup is None or dm is None:
        return not_run("directions", "refusal-atlas directions extract")
    ds, nodes, pos, layer0 = setup
    labels = [esc(short(store.node_label(n), 40)) for n in nodes]
    traces = []
    for layer in ds.layers:
        mat, ci, null = _cos_matrix(ds, nodes, layer, pos)
        floors: list[Any] = []
        for n in nodes:
            hit = dm[(dm["node"] == n) & (dm["layer"] == layer) & (dm["position"] == position_label(pos))]
            floors.append(hit.iloc[0]["noise_floor"] if not hit.empty else None)
        z: list[list[Any]] = []
        text = []
        for a in range(len(nodes)):
            row, zrow = [], []
            for b in range(len(nodes)):
                if a == b:
                    zrow.append(floors[a])
                    row.append(f"{esc(nodes[a])}<br>noise floor (split-half cosine) {fmt(floors[a])}")
                    continue
                zrow.append(mat[a, b])
                extra = f"<br>95% CI {ci_text(ci[a, b, 0], ci[a, b, 1])}" if ci is not None else ""
                extra += f"<br>null 95th pct {fmt(null[a, b])}" if null is not None else ""
                row.append(f"{esc(nodes[a])} × {esc(nodes[b])}<br>cosine {fmt(mat[a, b])}{extra}"
                           f"<br>floors {fmt(floors[a])} / {fmt(floors[b])}")
            text.append(row)
            z.append(none_for_nan(zrow))
        traces.append(go.Heatmap(z=z, x=labels, y=labels, text=text, hoverinfo="text", zmin=-1, zmax=1,
                                 colorscale="RdBu", reversescale=True, visible=layer == layer0,
                                 colorbar={"title": "cosine"}))
    fig = go.Figure(traces)
    buttons = [{"label": f"layer {layer}", "method": "update",
                "args": [{"visible": [m == i for m in range(len(ds.layers))]},
                         {"title": f"Cosine between node directions, layer {layer}, position {position_label(pos)}"}]}
               for i, layer in enumerate(ds.layers)]
    fig.update_layout(title=f"Cosine between node directions, layer {layer0}, position {position_label(pos)}",
                      updatemenus=[{"buttons": buttons, "active": ds.layers.index(layer0), "x": 1.0, "y": 1.15}],
                      yaxis={"autorange": "reversed"}, margin={"l": 160, "b": 140})
    return figs.add(fig, max(480, 28 * len(nodes) + 220))


def _overlap_figure(store: AtlasStore, g: nx.Graph, overlap: list[tuple[str, str, dict[str, Any]]],
                    taxonomy: list[tuple[str, str, dict[str, Any]]]) -> go.Figure:
    simple = nx.Graph()
    simple.add_nodes_from(g.nodes)
    simple.add_weighted_edges_from((a, b, max(float(d.get("weight", 0) or 0), 0.01)) for a, b, d in overlap)
    pos = nx.spring_layout(simple, seed=0, weight="weight") if overlap else nx.circular_layout(simple)
    traces = []
    for edges, colour, dash, name in ((taxonomy, "#d5dbe1", "dot", "taxonomy parent link"),
                                      (overlap, "#6b8fb5", "solid", "overlap beyond noise")):
        xs: list[float | None] = []
        ys: list[float | None] = []
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
        ci = f" {ci_text(data.get('ci_low'), data.get('ci_high'))}" if "ci_low" in data else ""
        floors = f"<br>floors {fmt(data.get('floor_a'))} / {fmt(data.get('floor_b'))}" if "floor_a" in data else ""
        mid_text.append(f"{esc(a)} – {esc(b)}<br>cosine {fmt(w)}{esc(ci)}{floors}")
    if mid_x:
        traces.append(go.Scatter(x=mid_x, y=mid_y, mode="markers", hovertext=mid_text, hoverinfo="text",
                                 marker={"size": 7, "color": "#6b8fb5", "opacity": 0.5}, showlegend=False))
    node_text = []
    for n, data in g.nodes(data=True):
        info = "<br>".join(f"{esc(k)}: {esc(fmt(v))}" for k, v in data.items() if k != "label")
        node_text.append(f"<b>{esc(data.get('label', store.node_label(n)))}</b><br>{esc(n)}<br>{info}")
    traces.append(go.Scatter(x=[pos[n][0] for n in g.nodes], y=[pos[n][1] for n in g.nodes],
                             mode="markers+text", text=[esc(short(n, 30)) for n in g.nodes],
                             textposition="top center", hovertext=node_text, hoverinfo="text",
                             marker={"size": 14, "color": "#243447"}, showlegend=False))
    fig = go.Figure(traces)
    where = f" (layer {g.graph.get('layer')}, position {g.graph.get('position')})" if g.graph else ""
    fig.update_layout(title=esc(f"Overlap graph{where}"), xaxis={"visible": False}, yaxis={"visible": False})
    return fig


def section_overlap(store: AtlasStore, figs: Figures) -> str:
    g = store.overlap_graph
    if g is None:
        return not_run("overlap graph", "refusal-atlas directions overlap")
    parts = []
    overlap, taxonomy = store.overlap_edges("overlap"), store.overlap_edges("taxonomy")
    if g.number_of_nodes():
        parts.append(figs.add(_overlap_figure(store, g, overlap, taxonomy), 520))
        edges = sorted(overlap, key=lambda e: -float(e[2].get("cos_debiased", e[2].get("weight", 0)) or 0))
        rows = [[a, b, d.get("cos_debiased"), ci_text(d.get("debiased_ci_low"), d.get("debiased_ci_high")),
                 d.get("weight"), d.get("floor_a"), d.get("floor_b"), d.get("null95"), d.get("distinct")]
                for a, b, d in edges[:100]]
        parts.append("<p class='small'>Each row: the noise-corrected cosine (an estimate of the cosine between the "
                     "two true directions) with its own bootstrap 95% interval; the raw cosine of the two estimates "
                     "beside it is pulled toward 0 by sampling noise, which is why it can sit below that interval "
                     "(its own bias-corrected interval is in overlap.json); each node's split-half floor; the 95th "
                     "percentile of the cosine with signal-free directions; distinct = upper bound below 1.</p>"
                     + html_table(["node a", "node b", "noise-corrected cosine", "its 95% CI", "raw cosine",
                                   "floor a", "floor b", "chance 95%", "distinct"], rows)
                     if rows else "<p>No pair of nodes overlaps beyond its noise at this layer.</p>")
    ov = store.overlap_json
    scalars = {k: v for k, v in ov.items() if isinstance(v, int | float | str | bool)}
    for group in ("spectrum", "sibling_test"):
        sub = ov.get(group)
        if isinstance(sub, dict):
            scalars.update({f"{group}.{k}": v for k, v in sub.items() if isinstance(v, int | float | str | bool)})
    if scalars:
        parts.append(html_table(["overlap statistic", "value"], list(scalars.items())))
    return "".join(parts) or "<p>The overlap graph is empty.</p>"


def section_profiles(store: AtlasStore, figs: Figures) -> str:
    dm = store.direction_metrics
    if dm is None:
        return not_run("directions", "refusal-atlas directions extract")
    setup = figure_setup(store)
    pos = position_label(setup[2]) if setup else str(dm["position"].iloc[0])
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
    if not panels:
        return "<p>No layer profile was measured.</p>"
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.07)
    palette = qualitative.Plotly + qualitative.D3
    for n_i, (node, rows) in enumerate(data.groupby("node", sort=True)):
        rows = rows.sort_values("layer")
        name = esc(short(store.node_label(str(node)) if node != POOLED else "pooled", 40))
        line = {"color": "#555" if node == POOLED else palette[n_i % len(palette)],
                "dash": "dash" if node == POOLED else "solid"}
        for i, m in enumerate(metrics, start=1):
            fig.add_trace(go.Scatter(x=rows["layer"], y=none_for_nan(rows[m]), mode="lines+markers", name=name,
                                     legendgroup=esc(node), showlegend=i == 1, line=line), row=i, col=1)
    if probe is not None:
        row_i = len(panels)
        for ppos, rows in probe.groupby("position"):
            rows = rows.sort_values("layer")
            fig.add_trace(go.Scatter(x=rows["layer"], y=none_for_nan(rows["probe_accuracy"]), mode="lines+markers",
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
