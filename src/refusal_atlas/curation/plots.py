"""Interactive plots of a clustering: the 2-D map, cluster sizes, stability.

Plotly figures written as self-contained HTML (plotly.js inlined, no CDN), so the files open
offline. Texts come from prompts and model responses, i.e. untrusted: hover text is HTML-escaped
before it reaches plotly (which renders hover labels as HTML).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from refusal_atlas.curation.stability import ari_phrase
from refusal_atlas.io import atomic_write

HOVER_CHARS = 300


def escape_hover(text: str, limit: int = HOVER_CHARS) -> str:
    """HTML-escaped, shortened text with line breaks for a hover label."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    escaped = html.escape(text, quote=True)
    return "<br>".join(escaped[i:i + 80] for i in range(0, len(escaped), 80)) or "(empty)"


def write_figure(fig: Any, path: Path) -> Path:
    """Atomic self-contained HTML (plotly.js inlined so it works without network)."""
    def _write(tmp: Path) -> None:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)

    return atomic_write(path, _write)


def _cluster_name(c: int, keywords: dict[int, list[str]]) -> str:
    if c == -1:
        return "outliers"
    words = ", ".join(keywords.get(c, [])[:3])
    return html.escape(f"{c}: {words}" if words else str(c))


def cluster_map(xy: np.ndarray, labels: np.ndarray, texts: list[str], keywords: dict[int, list[str]],
                title: str = "clusters (UMAP 2-D)") -> Any:
    """Scatter of the 2-D layout, one trace per cluster (outliers grey), hover = escaped text."""
    names = {c: _cluster_name(c, keywords) for c in set(labels.tolist())}
    return grouped_map(xy, labels, texts, names, title)


def grouped_map(xy: np.ndarray, labels: np.ndarray, texts: list[str], names: dict[int, str],
                title: str) -> Any:
    """Scatter of the 2-D layout, one trace per *name* (clusters sharing a name — e.g. mapped to one taxonomy
    node — share a colour); outliers grey. `names` are HTML-escaped by the caller; hover text is escaped here."""
    # heavy dependency (slow to import), loaded only when this runs
    import plotly.graph_objects as go

    groups: dict[str, list[int]] = {}
    for c in sorted(set(labels.tolist())):
        groups.setdefault("outliers" if c == -1 else names.get(c, str(c)), []).append(c)
    fig = go.Figure()
    for name, members in sorted(groups.items(), key=lambda kv: (kv[0] == "outliers", min(kv[1]))):
        idx = np.flatnonzero(np.isin(labels, members))
        fig.add_trace(go.Scattergl(
            x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=name,
            text=[escape_hover(f"[cluster {labels[i]}] {texts[i]}") for i in idx],
            hovertemplate="%{text}<extra>%{fullData.name}</extra>",
            marker={"size": 5, "opacity": 0.75, **({"color": "lightgrey"} if name == "outliers" else {})},
        ))
    fig.update_layout(title=html.escape(title), template="plotly_white", legend={"itemsizing": "constant"},
                      xaxis={"showticklabels": False}, yaxis={"showticklabels": False})
    return fig


def sizes_chart(sizes: dict[int, int], keywords: dict[int, list[str]]) -> Any:
    """Bar chart of cluster sizes, largest first, outliers last."""
    # heavy dependency (slow to import), loaded only when this runs
    import plotly.graph_objects as go

    ids = sorted((c for c in sizes if c != -1), key=lambda c: -sizes[c]) + ([-1] if -1 in sizes else [])
    fig = go.Figure(go.Bar(x=[_cluster_name(c, keywords) for c in ids], y=[sizes[c] for c in ids],
                           marker_color=["lightgrey" if c == -1 else "steelblue" for c in ids]))
    fig.update_layout(title="cluster sizes", template="plotly_white", yaxis_title="rows")
    return fig


def stability_chart(stability: dict, keywords: dict[int, list[str]]) -> Any:
    """Per-cluster Jaccard stability (seeds and resamples) and the min_cluster_size sweep."""
    # heavy dependency (slow to import), loaded only when this runs
    import plotly.graph_objects as go

    # heavy dependency (slow to import), loaded only when this runs
    from plotly.subplots import make_subplots

    per = stability.get("per_cluster", {})
    ids = sorted(per, key=int)
    names = [_cluster_name(int(c), keywords) for c in ids]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per-cluster Jaccard stability",
                                                       "min_cluster_size sweep"))
    fig.add_trace(go.Bar(x=names, y=[per[c]["seed_jaccard"] for c in ids], name="seeds"), 1, 1)
    fig.add_trace(go.Bar(x=names, y=[per[c]["resample_jaccard"] for c in ids], name="resamples"), 1, 1)
    sweep = stability.get("min_cluster_size_sweep", [])
    fig.add_trace(go.Scatter(x=[r["min_cluster_size"] for r in sweep], y=[r["n_clusters"] for r in sweep],
                             mode="lines+markers", name="clusters"), 1, 2)
    fig.add_trace(go.Scatter(x=[r["min_cluster_size"] for r in sweep],
                             y=[100 * r["outlier_fraction"] for r in sweep],
                             mode="lines+markers", name="outliers %"), 1, 2)
    seeds = stability.get("seeds", {}).get("pairwise_ari", {})
    res = stability.get("resamples", {}).get("ari_vs_reference", {})
    fig.update_layout(template="plotly_white", barmode="group",
                      title=f"{ari_phrase('seed-to-seed ARI', seeds, len(ids))} · "
                            f"{ari_phrase('resample ARI vs reference', res, len(ids))}")
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    return fig
