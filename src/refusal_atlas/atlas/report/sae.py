"""The SAE section: the run's SAE in figures, each node's selected latents (with their top-activating
contexts and promoted tokens, escaped), the cross-clamp heatmap beside the cross-ablation heatmap,
and the overlap graph of the nodes' feature sets (Jaccard against its bootstrap and chance floors)."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusal_atlas.atlas.report.html import Figures, df_table, esc, fmt, html_table, none_for_nan, not_run, short
from refusal_atlas.atlas.sae_read import SaeView, sae_view
from refusal_atlas.atlas.store import AtlasStore

__all__ = ["SAE_HOW", "SAE_TITLE", "section_sae"]

SAE_TITLE = "SAE features per harm source"
SAE_HOW = ("A sparse autoencoder trained on the model's own chat activations at the causally selected layer splits "
           "the residual stream into latents. Per node, candidates are the latents whose decoder row points along "
           "the node's refusal direction or along the pooled refusal direction (a node's direction can be mostly "
           "its topic); the K* kept are those whose activation most raises the first-token refusal log-odds on the "
           "node's own prompts (gradient × activation, or integrated gradients). Clamping a node's K* latents (error "
           "term kept) should remove its refusal: the cross-clamp heatmap sits beside the cross-ablation heatmap of "
           "the directions. Two nodes' feature sets are distinct when their Jaccard's bootstrap upper bound is below "
           "both nodes' self-agreement, overlapping when it exceeds what two random K* subsets of their candidates "
           "share. Not a verdict: on the known-answer organisms the planted pair's sets overlap for one shared refusal "
           "and stay at chance for two refusals planted apart down to their wording, but two refusals planted in "
           "separate blocks that end in the same words overlapped as well — read overlap as shared latents (often "
           "the refusal's own wording), not as one mechanism (README, 'SAE features').")
PER_NODE = 5


def _summary_html(view: SaeView) -> str:
    s = view.summary or {}
    steps = s.get("step_seconds") or {}
    items = [("model", s.get("model")), ("layer", s.get("layer")), ("latents (width)", s.get("width")),
             ("k (active per token)", s.get("k")), ("training tokens", s.get("tokens")), ("FVU", s.get("fvu")),
             ("L0", s.get("l0")), ("dead latents", s.get("dead_fraction")), ("K* chosen by", s.get("selected_by")),
             ("candidates by cosine to", s.get("candidates")), ("attribution", s.get("attribution")),
             ("stage seconds", s.get("seconds")),
             ("seconds per step", ", ".join(f"{k} {fmt(v, 1)}" for k, v in steps.items()) or None),
             ("weights sha256", s.get("sae_sha256"))]
    return html_table(["figure", "value"], [[k, v] for k, v in items if v is not None])


def _features_html(features: pd.DataFrame) -> str:
    if not len(features):
        return "<p class='small'>No node had a direction to select features for.</p>"
    rows = []
    for _, r in features.sort_values(["node", "rank"]).groupby("node", sort=True).head(PER_NODE).iterrows():
        contexts = list(r["top_contexts"]) if r.get("top_contexts") is not None else []
        tokens = list(r["promoted_tokens"]) if r.get("promoted_tokens") is not None else []
        rows.append([r["node"], int(r["rank"]), int(r["feature"]), r.get("decoder_cosine"), r.get("attribution"),
                     r.get("mean_act_node"), r.get("mean_act_harmless"), contexts[0] if contexts else "",
                     " ".join(repr(t) for t in tokens[:6])])
    return (f"<p class='small'>The first {PER_NODE} of each node's K* latents (all of them: "
            "<code>refusal-atlas sae features</code>, one: <code>refusal-atlas query feature ID</code>). The "
            "context shows the latent's most activating token in ⟦ ⟧.</p>"
            + html_table(["node", "rank", "feature", "decoder cos", "attribution", "act node", "act harmless",
                          "top context", "promotes"], rows))


def _pivot(df: pd.DataFrame, row: str, col: str, value: str, nodes: list[str]) -> list[list[float | None]]:
    piv = df.pivot_table(index=row, columns=col, values=value, aggfunc="mean").reindex(index=nodes, columns=nodes)
    return [none_for_nan(r) for r in piv.to_numpy().tolist()]


def _heatmaps_html(clamp: pd.DataFrame, store: AtlasStore, figs: Figures) -> str:
    clamp = clamp[clamp["method"].astype(str) == "clamp"]
    if not len(clamp):
        return "<p class='small'>The cross-clamp was not scored (no refusal-opening tokens in this run).</p>"
    nodes = sorted(set(clamp["source"].astype(str)) | set(clamp["target"].astype(str)))
    xa = store.cross_ablation
    panels = [("clamping a node's K* SAE latents", _pivot(clamp, "source", "target", "refusal_after", nodes))]
    if xa is not None and {"ablated", "evaluated", "refusal_rate"} <= set(xa.columns):
        own = xa[xa["method"].astype(str) == "diff_means"] if "method" in xa.columns else xa
        panels.append(("ablating the node's direction", _pivot(own, "ablated", "evaluated", "refusal_rate", nodes)))
    labels = [esc(short(n, 30)) for n in nodes]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[esc(t) for t, _ in panels], horizontal_spacing=0.12)
    for i, (title, z) in enumerate(panels, start=1):
        text = [[f"{esc(title)}<br>source {esc(a)}<br>on {esc(b)} prompts<br>refusal {fmt(v)}"
                 for b, v in zip(nodes, row, strict=True)] for a, row in zip(nodes, z, strict=True)]
        fig.add_trace(go.Heatmap(z=z, x=labels, y=labels, text=text, hoverinfo="text", zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=i == len(panels),
                                 colorbar={"title": "refusal"}), row=1, col=i)
        fig.update_yaxes(autorange="reversed", row=1, col=i)
    fig.update_layout(title="Refusal left on each node's held-out prompts (columns) after intervening on a node "
                            "(rows): SAE clamp vs direction ablation", margin={"l": 160, "b": 140})
    n = int(clamp["n"].iloc[0]) if "n" in clamp.columns and len(clamp) else None
    factor = clamp["factor"].iloc[0] if "factor" in clamp.columns else None
    note = (f"<p class='small'>First-token refusal (log-odds of the refusal-opening tokens &gt; 0) on {fmt(n)} "
            f"held-out prompts per node; clamp factor {fmt(factor, 1)}; the cross-ablation comes from the causal "
            "stage (its own prompts and measure).</p>")
    own = clamp["own"].astype(bool)
    c = clamp.assign(after_own=clamp["refusal_after"].where(own), after_others=clamp["refusal_after"].where(~own),
                     before_own=clamp["refusal_before"].where(own))
    summary = c.groupby("source", sort=True).agg(
        own_before=("before_own", "mean"), own_after=("after_own", "mean"), others_after=("after_others", "mean"),
        harmless_kl=("harmless_kl", "mean"), n_features=("n_features", "first")).reset_index()
    return figs.add(fig, 460) + note + df_table(summary)


def _jaccard_html(pairs: pd.DataFrame, shared: pd.DataFrame | None, figs: Figures) -> str:
    if not len(pairs):
        return "<p class='small'>Fewer than two nodes: no feature-set overlap to compare.</p>"
    nodes = sorted(set(pairs["node_a"].astype(str)) | set(pairs["node_b"].astype(str)))
    pos = {n: (math.cos(2 * math.pi * i / len(nodes)), math.sin(2 * math.pi * i / len(nodes)))
           for i, n in enumerate(nodes)}
    fig = go.Figure()
    for _, r in pairs.iterrows():
        (x0, y0), (x1, y1) = pos[str(r["node_a"])], pos[str(r["node_b"])]
        if bool(r["overlapping"]):
            colour, dash = "#ca6f1e", "solid"
        elif bool(r["distinct"]):
            continue  # distinct: no edge
        else:
            colour, dash = "#b0b0b0", "dot"
        jac = float(r["jaccard"]) if r["jaccard"] == r["jaccard"] else 0.0
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text", showlegend=False,
                                 line={"width": 1 + 10 * jac, "color": colour, "dash": dash},
                                 text=f"{esc(r['node_a'])} – {esc(r['node_b'])}: Jaccard {fmt(r['jaccard'])}"))
    fig.add_trace(go.Scatter(x=[pos[n][0] for n in nodes], y=[pos[n][1] for n in nodes], mode="markers+text",
                             text=[esc(short(n, 30)) for n in nodes], textposition="top center", hoverinfo="text",
                             marker={"size": 16, "color": "#6b8fb5"}, showlegend=False))
    fig.update_layout(title="Feature-set overlap: solid = more shared latents than chance (width = Jaccard; the "
                            "table says if also distinct), dotted = undecided, no edge = distinct",
                      xaxis={"visible": False}, yaxis={"visible": False})
    parts = [figs.add(fig, 460), df_table(pairs, ["node_a", "node_b", "jaccard", "ci_low", "ci_high", "self_a_low",
                                                  "self_b_low", "chance_95", "distinct", "overlapping", "n_boot"])]
    if shared is not None and len(shared) and "shared" in shared.columns:
        common = shared[shared["shared"].astype(bool)]
        parts.append(f"<p class='small'>{len(common)} of {len(shared)} selected latents are shared by two or more "
                     "nodes.</p>")
        if len(common):
            rows = [[int(r["feature"]), int(r["n_nodes"]), ", ".join(map(str, r["nodes"]))]
                    for _, r in common.sort_values("n_nodes", ascending=False).iterrows()]
            parts.append(html_table(["feature", "nodes selecting it", "which"], rows, max_rows=40))
    return "".join(parts)


def section_sae(store: AtlasStore, figs: Figures) -> str:
    view = sae_view(store)
    if view.summary is None:
        return not_run("SAE features (sae/)", "refusal-atlas run (sae stage)")
    if view.summary.get("skipped"):
        return f"<p class='notrun'>SAE stage skipped: {esc(view.summary['skipped'])}</p>"
    parts = ["<h3>The SAE</h3>", _summary_html(view)]
    if view.features is not None:
        parts += ["<h3>Selected features per node</h3>", _features_html(view.features)]
    if view.clamp is not None:
        parts += ["<h3>Cross-clamp beside cross-ablation</h3>", _heatmaps_html(view.clamp, store, figs)]
    if view.jaccard is not None:
        parts += ["<h3>Overlap of the feature sets</h3>", _jaccard_html(view.jaccard, view.shared, figs)]
    return "".join(parts)
