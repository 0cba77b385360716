"""Report sections about interventions: selection, cross-ablation, steering, wording, conditions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusal_atlas.atlas.report.html import (
    Figures,
    ci_text,
    df_table,
    esc,
    fmt,
    html_table,
    none_for_nan,
    not_run,
    short,
)
from refusal_atlas.atlas.store import AtlasStore

POOLED = "@pooled"


def _selection_html(store: AtlasStore) -> str:
    """The one direction the causal stage selected (layer, position, ablation scope, scores), then every
    candidate it scored, collapsed."""
    sel = store.selection
    if sel is None or "selected" not in sel.columns:
        return ""
    chosen = sel[sel["selected"].fillna(False).astype(bool)]
    if chosen.empty:
        return ""
    top = chosen.iloc[0]
    what = "the pooled direction" if str(top["node"]) == POOLED else f"the direction of {top['node']}"
    scope = f", ablated from layer {int(top['ablate_from'])} on" if "ablate_from" in top and \
        top["ablate_from"] == top["ablate_from"] else ""
    cols = [c for c in ("node", "layer", "position", "ablate_from", "bypass_score", "induce_score", "kl_score",
                        "tier", "filtered", "selected") if c in sel.columns]
    return (f"<h3>Selected direction</h3><p>The causal stage selected {esc(what)} at <b>layer {int(top['layer'])}, "
            f"position {esc(top['position'])}</b>{esc(scope)} (bypass score {esc(fmt(top.get('bypass_score')))}, "
            f"induce score {esc(fmt(top.get('induce_score')))}, KL {esc(fmt(top.get('kl_score')))}). Every causal "
            "test, the cross-ablation below, the overlap graph and the heatmap's opening layer use this layer and "
            "position; per-node directions are each node's own difference of means there.</p>"
            "<p class='small'>Chosen as Arditi et al. do: among candidates that induce refusal when added (induce "
            "score &gt; 0: mean refusal log-odds on harmless prompts), cost little KL on harmless prompts (&lt; 0.1) "
            "and sit below 0.8 of the depth, the lowest bypass score (mean refusal log-odds on harmful prompts with "
            "the direction ablated).</p>"
            f"<details><summary>All {len(sel)} candidates scored</summary>{df_table(sel, cols, max_rows=200)}"
            "</details>")


def _cross_ablation_html(xa: pd.DataFrame, figs: Figures) -> str:
    d = xa.copy()
    method = d["method"].astype(str) if "method" in d.columns else pd.Series("diff_means", index=d.index)
    d["row"] = [a if m in ("diff_means", "none", "nan") else f"{a} [{m}]"
                for a, m in zip(d["ablated"].astype(str), method, strict=True)]
    order = sorted(d["row"].unique(), key=lambda r: (r != "none", r != POOLED, "[" in r, r))
    piv = d.pivot_table(index="row", columns="evaluated", values="refusal_rate", aggfunc="mean").reindex(order)
    text = [[f"ablate {esc(a)}<br>on {esc(e)} prompts<br>refusal {fmt(piv.loc[a, e])}" for e in piv.columns]
            for a in piv.index]
    measure = str(d["refusal_measure"].iloc[0]) if "refusal_measure" in d.columns else "refusal rate"
    fig = go.Figure(go.Heatmap(z=[none_for_nan(row) for row in piv.to_numpy().tolist()],
                               x=[esc(short(c, 40)) for c in piv.columns],
                               y=[esc(short(r, 50)) for r in piv.index], text=text, hoverinfo="text",
                               zmin=0, zmax=1, colorscale="Viridis", colorbar={"title": "refusal"}))
    fig.update_layout(title=esc(f"Cross-ablation: {measure} on each node's prompts (columns) with a direction "
                                "ablated (rows; none = no ablation)"), xaxis_title="evaluated on",
                      yaxis_title="ablated direction", yaxis={"autorange": "reversed"}, margin={"l": 200, "b": 140})
    parts = [figs.add(fig, max(420, 28 * len(piv.index) + 220))]
    own = d["ablated"].astype(str) == d["evaluated"].astype(str)
    d["own"] = np.where(own, d["refusal_rate"], np.nan)
    d["others"] = np.where(~own, d["refusal_rate"], np.nan)
    agg = {"own": ("own", "mean"), "others": ("others", "mean"), "all": ("refusal_rate", "mean")}
    if "harmless_kl" in d.columns:
        agg["harmless_kl"] = ("harmless_kl", "mean")
    summary = d.groupby("row", sort=False).agg(**agg).reindex(order).reset_index()
    parts.append("<p class='small'>Per ablated direction: mean refusal on its own node's prompts, on the other "
                 "nodes' prompts, overall, and the KL it costs on harmless prompts.</p>" + df_table(summary))
    return "".join(parts)


def _steering_html(steer: pd.DataFrame, figs: Figures) -> str:
    fig = go.Figure()
    for node, rows in steer.groupby("node", sort=True):
        rows = rows.sort_values("layer")
        fig.add_trace(go.Scatter(x=rows["layer"], y=none_for_nan(rows["induced_refusal_rate"]), mode="lines+markers",
                                 name=esc(short(node, 40))))
    fig.update_layout(title="Steering: refusal induced on harmless prompts by adding a node's direction",
                      xaxis_title="layer", yaxis_title="induced refusal rate", yaxis_range=[0, 1.05])
    return figs.add(fig, 420)


def _wording_html(wording: pd.DataFrame, figs: Figures) -> str:
    parts = ["<h3>Wording vs detection</h3>"]
    if "layer" in wording.columns and {"probe_accuracy", "refusal_token_z_mean"} & set(wording.columns):
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        w = wording.sort_values("layer")
        if "probe_accuracy" in w.columns:
            fig.add_trace(go.Scatter(x=w["layer"], y=none_for_nan(w["probe_accuracy"]), mode="lines+markers",
                                     name="detection: probe accuracy for node identity"), secondary_y=False)
        if "probe_chance" in w.columns:
            fig.add_trace(go.Scatter(x=w["layer"], y=none_for_nan(w["probe_chance"]), mode="lines",
                                     name="probe chance", line={"dash": "dot", "color": "gray"}), secondary_y=False)
        for col, name in (("refusal_token_z_mean", "wording: refusal-token promotion (mean over nodes, z)"),
                          ("pooled_refusal_token_z", "wording: pooled direction (z)"),
                          ("own_wording_z_mean", "wording: own node-specific wording (z)")):
            if col in w.columns and w[col].notna().any():
                fig.add_trace(go.Scatter(x=w["layer"], y=none_for_nan(w[col]), mode="lines+markers", name=name,
                                         line={"dash": "dash"}), secondary_y=True)
        fig.update_layout(title="Where is the category detected, where is the refusal worded?",
                          xaxis_title="layer", legend={"font": {"size": 10}})
        fig.update_yaxes(title_text="probe accuracy", secondary_y=False)
        fig.update_yaxes(title_text="logit-lens z-score", secondary_y=True)
        parts.append(figs.add(fig, 420))
    parts.append(df_table(wording, max_rows=200))
    return "".join(parts)


def _components_html(comp: pd.DataFrame, figs: Figures) -> str:
    """The shared-vs-separable evidence: the fraction of each node's refusal log-odds that ablating each node's
    late-layer direction removes, relative to the node's own direction."""
    base = comp[comp["ablated"].astype(str) == "none"].set_index("evaluated")["refusal_score"]
    own = comp[comp["ablated"].astype(str) == comp["evaluated"].astype(str)].set_index("evaluated")["refusal_score"]
    d = comp[comp["ablated"].astype(str) != "none"].copy()
    d["removed"] = [(base.get(e, np.nan) - r) / (base.get(e, np.nan) - own.get(e, np.nan))
                    if base.get(e, np.nan) - own.get(e, np.nan) > 0 else np.nan
                    for e, r in zip(d["evaluated"].astype(str), d["refusal_score"], strict=True)]
    piv = d.pivot_table(index="ablated", columns="evaluated", values="removed", aggfunc="mean")
    layer = int(comp["layer"].dropna().iloc[0]) if "layer" in comp.columns and comp["layer"].notna().any() else None
    text = [[f"ablate {esc(a)}<br>on {esc(e)} prompts<br>removes {fmt(piv.loc[a, e])} of what its own removes"
             for e in piv.columns] for a in piv.index]
    fig = go.Figure(go.Heatmap(z=[none_for_nan(row) for row in piv.to_numpy().tolist()],
                               x=[esc(short(c, 40)) for c in piv.columns], y=[esc(short(r, 50)) for r in piv.index],
                               text=text, hoverinfo="text", zmin=0, zmax=1.2, colorscale="Viridis",
                               colorbar={"title": "f"}))
    fig.update_layout(title=esc("Components: share of each node's refusal log-odds removed by ablating a direction "
                                f"taken at layer {layer}" if layer is not None else "Components"),
                      xaxis_title="evaluated on", yaxis_title="ablated direction", yaxis={"autorange": "reversed"},
                      margin={"l": 200, "b": 140})
    return ("<h3 id='components'>Components: late-layer directions</h3><p class='small'>Each node's direction at "
            "the late scan layer (where every block has written its part), ablated in every layer. A cell is "
            "f = (refusal log-odds lost on the column's prompts) / (what the column's own direction removes): "
            "1 means the row's direction carries the column's refusal, 0 that it carries none of it. The "
            "shared-vs-separable verdicts read this table with paired bootstrap intervals (Findings).</p>"
            + figs.add(fig, max(380, 28 * len(piv.index) + 220)))


def _restoration_html(rest: pd.DataFrame, figs: Figures) -> str:
    """Where each node's refusal lives: log-odds lost when a window of blocks is set back to the reference."""
    d = rest.assign(window=[f"{int(lo)}-{int(hi)}" for lo, hi in zip(rest["block_lo"], rest["block_hi"],
                                                                         strict=True)],
                    drop=rest["logit_score_baseline"] - rest["logit_score"])
    order = [f"{int(lo)}-{int(hi)}" for lo, hi in sorted(set(zip(rest["block_lo"], rest["block_hi"],
                                                                   strict=True)))]
    piv = d.pivot_table(index="node", columns="window", values="drop", aggfunc="mean").reindex(columns=order)
    text = [[f"{esc(n)}: blocks {w} restored<br>refusal log-odds fall by {fmt(piv.loc[n, w])}" for w in piv.columns]
            for n in piv.index]
    fig = go.Figure(go.Heatmap(z=[none_for_nan(row) for row in piv.to_numpy().tolist()], x=list(piv.columns),
                               y=[esc(short(r, 50)) for r in piv.index], text=text, hoverinfo="text",
                               colorscale="Viridis", colorbar={"title": "log-odds drop"}))
    ref = str(rest["reference"].dropna().iloc[0]) if "reference" in rest.columns and rest["reference"].notna().any() \
        else "the reference model"
    fig.update_layout(title=esc(f"Restoration scan: refusal lost when a window of blocks gets {short(ref, 40)}'s "
                                "weights back"), xaxis_title="restored blocks", yaxis_title="node",
                      margin={"l": 200})
    return ("<h3 id='restoration'>Where each component acts: restoration scan</h3><p class='small'>Each window of "
            f"blocks is set back to the weights of {esc(short(ref, 60))} (the model this one was fine-tuned from) "
            "while the node's own prompts run; the cell is the mean fall in refusal log-odds. The windows whose "
            "fine-tuned weights a node's refusal needs light up; the where-it-acts verdicts read this table "
            "(Findings).</p>" + figs.add(fig, max(320, 28 * len(piv.index) + 200)))


def section_causal(store: AtlasStore, figs: Figures) -> str:
    xa, steer = store.cross_ablation, store.steering
    if xa is None and steer is None:
        return not_run("causal tests", "refusal-atlas directions cross-ablate / steer")
    parts = [_selection_html(store)]
    if xa is not None and {"ablated", "evaluated", "refusal_rate"} <= set(xa.columns):
        parts.append(_cross_ablation_html(xa, figs))
    elif xa is not None:
        parts.append(df_table(xa))
    if steer is not None and {"node", "layer", "induced_refusal_rate"} <= set(steer.columns):
        parts.append(_steering_html(steer, figs))
    elif steer is not None:
        parts.append(df_table(steer))
    comp, rest = store.components, store.restoration
    if comp is not None and {"ablated", "evaluated", "refusal_score"} <= set(comp.columns):
        parts.append(_components_html(comp, figs))
    if rest is not None and {"node", "block_lo", "block_hi", "logit_score", "logit_score_baseline"} <= \
            set(rest.columns):
        parts.append(_restoration_html(rest, figs))
    if store.wording is not None:
        parts.append(_wording_html(store.wording, figs))
    return "".join(parts)


# ------------------------------------------------------------------------------------ conditions
def _error_bars(d: pd.DataFrame, col: str, lo: str, hi: str) -> dict[str, object] | None:
    """Asymmetric error bars; none where the interval is missing (n = 1 has no interval)."""
    if not {lo, hi} <= set(d.columns):
        return None
    single = (pd.to_numeric(d["n"], errors="coerce") <= 1) if "n" in d.columns else pd.Series(False, index=d.index)
    up = (d[hi] - d[col]).where(~single)
    down = (d[col] - d[lo]).where(~single)
    return {"type": "data", "symmetric": False, "array": none_for_nan(up), "arrayminus": none_for_nan(down)}


def _refusal_ci(ct: pd.DataFrame) -> tuple[str, str]:
    """The refusal-rate interval's columns: as the conditions step writes them, or already renamed."""
    return ("refusal_ci_low", "refusal_ci_high") if "refusal_ci_low" in ct.columns else ("ci_low", "ci_high")


def condition_rows(ct: pd.DataFrame) -> tuple[list[str], list[list[object]]]:
    """The condition table with each interval as one cell ("n = 1, no CI" where there is one prompt)."""
    lo, hi = _refusal_ci(ct)
    n = ct["n"] if "n" in ct.columns else pd.Series([None] * len(ct), index=ct.index)
    columns = ["node", "condition", "expected", "n", "refusal_rate", "refusal 95% CI"]
    rows: list[list[object]] = []
    has_projection = "projection" in ct.columns
    if has_projection:
        columns += ["projection", "projection 95% CI"]
    known = {"node", "condition", "expected", "n", "refusal_rate", lo, hi, "projection", "projection_ci_low",
             "projection_ci_high"}
    extra = [c for c in ct.columns if c not in known]
    columns += extra
    for i, (_, r) in enumerate(ct.iterrows()):
        row: list[object] = [r.get("node"), r.get("condition"), r.get("expected"), n.iloc[i], r.get("refusal_rate"),
                             ci_text(r.get(lo), r.get(hi), n.iloc[i])]
        if has_projection:
            row += [r.get("projection"), ci_text(r.get("projection_ci_low"), r.get("projection_ci_high"), n.iloc[i])]
        rows.append(row + [r.get(c) for c in extra])
    return columns, rows


def section_conditions(store: AtlasStore, figs: Figures) -> str:
    ct = store.condition_table
    if ct is not None:
        columns, rows = condition_rows(ct)
        parts = [html_table(columns, rows)]
        if {"node", "condition", "refusal_rate"} <= set(ct.columns):
            d = ct.copy()
            d["condition"] = d["condition"].fillna("").replace("", "(none)")
            x = [f"{esc(n)}<br>{esc(c)}" for n, c in zip(d["node"], d["condition"], strict=True)]
            panels = [("refusal_rate", *_refusal_ci(d), "refusal rate", "#ca6f1e")]
            if "projection" in d.columns and d["projection"].notna().any():
                panels.append(("projection", "projection_ci_low", "projection_ci_high",
                               "projection on the node's direction", "#6b8fb5"))
            fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.1,
                                subplot_titles=[p[3] + " (95% CI)" for p in panels])
            for i, (col, lo, hi, _, colour) in enumerate(panels, start=1):
                fig.add_trace(go.Bar(x=x, y=none_for_nan(d[col]), error_y=_error_bars(d, col, lo, hi),
                                     marker_color=colour, showlegend=False), row=i, col=1)
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
