"""Report sections about behaviour: the model organism's adherence and the cluster maps."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from refusal_atlas.atlas.report.html import Figures, df_table, esc, fmt, hover, html_table, not_run, short
from refusal_atlas.atlas.store import AtlasStore, ClusterView

MAX_POINTS = 5000


def section_organism(store: AtlasStore, figs: Figures) -> str:
    org, held = store.organism, store.adherence
    if org is None and held is None:
        return not_run("organism", "refusal-atlas organism build (run does it for --model default)")
    parts = []
    metrics = (org or {}).get("metrics") or {}
    if metrics:
        rows = [(k, v) for k, v in metrics.items() if not isinstance(v, dict | list)]
        parts.append(html_table(["metric", "value"], rows))
    if held is not None and not held.empty and {"category", "refused"} <= set(held.columns):
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


def _cluster_view_html(store: AtlasStore, view: ClusterView, figs: Figures, title: str, mapped: bool) -> str:
    clusters, assign = view.clusters, view.assignments
    parts = []
    labels = {c.id: c.label or f"cluster {c.id}" for c in clusters}
    # mapped: one colour per taxonomy node the clusters map to, so a node split over several clusters shows as one
    # colour; clusters that fit no node keep their own name and colour
    colour_of = {c.id: (f"node {c.best_nodes[0][0]}" if mapped and c.fits and c.best_nodes else
                        ("outliers" if c.outlier else f"cluster {c.id}: {labels[c.id]}")) for c in clusters}
    if assign is not None and {"x", "y", "cluster"} <= set(assign.columns):
        data = assign.head(MAX_POINTS).copy()
        text_col = next((c for c in ("label_text", "text", "response", "prompt", "document") if c in data.columns),
                        None)
        data["_colour"] = [colour_of.get(str(cid), f"cluster {cid}") for cid in data["cluster"]]
        fig = go.Figure()
        for name, rows in data.groupby("_colour", sort=True):
            texts = [hover(f"[cluster {cid}] {t}") for cid, t in zip(rows["cluster"], rows[text_col], strict=True)
                     ] if text_col else None
            fig.add_trace(go.Scatter(
                x=rows["x"], y=rows["y"], mode="markers", name=esc(short(str(name), 60)), hovertext=texts,
                hoverinfo="text+name" if texts else "name",
                marker={"size": 6, "opacity": 0.75, "color": "#b0b7bf" if name == "outliers" else None},
            ))
        fig.update_layout(title=esc(title), xaxis_title="map x", yaxis_title="map y", legend={"font": {"size": 10}})
        parts.append(figs.add(fig, 520))
    # clustered by one column and named by another (refusals by what was asked): the clustered text a reader came
    # for — the reply's wording — is shown too, as each cluster's most common one with its count
    commonest = _commonest_texts(assign) if assign is not None and "label_text" in assign.columns else {}
    if clusters:
        rows = []
        for c in clusters:
            best = ", ".join(f"{n} ({fmt(s)})" for n, s in c.best_nodes[:3])
            if c.outlier:
                best = "outliers"
            elif c.fits is False:
                best = f"fits no node (closest: {best or '–'})"
            name = f"{c.best_nodes[0][0]}: {c.label}" if mapped and c.fits and c.best_nodes else c.label
            row = [c.id, name, c.size, ", ".join(c.keywords[:8])]
            row += [best or "–", c.method or "–"] if mapped else []
            row += [commonest.get(c.id, "–")] if commonest else []
            rows.append([*row, c.stability, c.examples[0] if c.examples else ""])
        columns = ["cluster", "label", "size", "keywords"]
        columns += ["best node(s) (score)", "mapped by"] if mapped else []
        columns += ["most common text clustered (rows)"] if commonest else []
        parts.append(html_table([*columns, "stability (seed Jaccard)", "example"], rows))
    if mapped:
        parts.append(_tree_vs_branches(view))
    shown = {k: v for k, v in view.metrics.items()
             if not k.endswith((".min", ".max", ".pairs")) and not k.startswith("stability.")}
    if shown:
        parts.append(html_table(["clustering metric", "value"], list(shown.items())))
    if view.proposals_file is not None:
        parts.append(f"<p>Proposed nodes for clusters that fit no node: <code>"
                     f"{esc(view.proposals_file.relative_to(store.root))}</code> "
                     "(review with <code>refusal-atlas taxonomy accept</code>).</p>")
    return "".join(parts)


def _tree_vs_branches(view: ClusterView) -> str:
    """The cluster tree against the taxonomy tree: the branch level's clusters each linked to a branch, and
    every level's agreement with branches and with nodes (mapping.json `tree`)."""
    tree = view.tree_mapping
    top = tree.get("branch_level") or {}
    if not top.get("clusters"):
        return ""
    head = (f"<h3>The cluster tree against the taxonomy's branches</h3><p class='small'>Level {fmt(top.get('level'))} "
            f"({fmt(top.get('n_clusters'))} clusters), chosen by {esc(str(top.get('rule', '')))}; ARI against the "
            f"rows' branches {fmt(top.get('ari'))} (n = {fmt(top.get('n'))}). The leaves are linked to nodes in "
            "the table above.</p>")
    rows = [[c["cluster"], c["size"], c["branch"], c["score"], c["method"], "yes" if c.get("fits") else "no",
             (f"{c['runner_up']['branch']} ({fmt(c['runner_up']['score'])})" if c.get("runner_up") else "–")]
            for c in top["clusters"]]
    table = html_table(["cluster", "size", "branch", "score", "by", "fits", "runner-up"], rows)
    levels = [[lv["level"], lv["n_clusters"], lv.get("ari_branch"), lv.get("ari_node")]
              for lv in tree.get("levels", []) if "ari_branch" in lv]
    return head + table + (html_table(["level", "clusters", "ARI vs branches", "ARI vs nodes"], levels)
                           if levels else "")


def _commonest_texts(assign: pd.DataFrame) -> dict[str, str]:
    """Per cluster id (as the store names clusters): its most frequent clustered text and how many of its rows
    are that text ("I'm sorry, … (41 of 64)"), or that no text repeats ("19 different texts, e.g. …")."""
    if not {"cluster", "text"} <= set(assign.columns):
        return {}
    out = {}
    for cid, rows in assign.groupby("cluster", sort=True):
        counts = rows["text"].astype(str).str.strip().value_counts(sort=False)
        top = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")  # ties: text order
        first = short(top.index[0], 200)
        out[str(cid)] = (f"{len(rows)} different texts, e.g. {first}" if int(top.iloc[0]) == 1 < len(rows)
                         else f"{first} ({int(top.iloc[0])} of {len(rows)})")
    return out


def _text_column(folder: Path) -> str:
    try:
        meta = json.loads((folder / "clusters.json").read_text(encoding="utf-8"))
        return str((meta.get("input") or {}).get("text_column") or "texts")
    except (OSError, ValueError, AttributeError):
        return "texts"


def section_clusters(store: AtlasStore, figs: Figures) -> str:
    main, responses = store.cluster_view, store.response_cluster_view
    if not main.exists() and not responses.exists():
        return not_run("clusters", "refusal-atlas curate cluster / map")
    parts = []
    if main.exists():
        column = _text_column(main.folder)
        parts.append(_cluster_view_html(store, main, figs, f"Cluster map of the corpus ({column})", mapped=True))
    if responses.exists():
        parts.append("<h3>Refusal wordings</h3><p class='small'>The responses the detector calls refusals, "
                     f"clustered: how many distinct ways does the model refuse?{_net_of_note(responses)}</p>")
        parts.append(_cluster_view_html(store, responses, figs, "Cluster map of the refusals (responses)",
                                        mapped=False))
    parts.append(_planted_wordings(store))
    return "".join(parts)


def _net_of_note(view: ClusterView) -> str:
    """How the replies were made net of their prompts (numbers only; the column name escaped)."""
    net = view.net_of
    if not net:
        return ""
    return (f" Each reply is clustered net of its {esc(str(net.get('column')))} (a ridge fit's residual, "
            f"lambda {fmt(net.get('lambda'))}): the {esc(str(net.get('column')))} explains "
            f"{fmt(net.get('explained_variance'))} of the replies' embedding variance, so the clusters group how the "
            "model refused rather than the topic it echoed.")


def _planted_wordings(store: AtlasStore) -> str:
    """The organism's known answer for the refusal clusters: what each reply says vs what was taught (numbers only),
    on the evaluation requests (cluster stage) and on the requests the wordings were taught on (wording stage)."""
    wording = ((store.stage_records.get("cluster") or {}).get("result") or {}).get("wording") or {}
    taught = (store.stage_records.get("wording") or {}).get("result") or {}
    parts = []
    if wording:
        said, adherence = wording.get("said") or {}, wording.get("adherence") or {}
        parts.append(
            "These clusters against the "
            f"planted wording each reply says: ARI {fmt(said.get('ari'))} ({fmt(said.get('groups'))} wordings, "
            f"n = {fmt(said.get('n'))}); against the wording taught for the request's node: ARI "
            f"{fmt(wording.get('ari'))} (exact texts: {fmt(wording.get('exact_text_ari'))}; "
            f"n = {fmt(wording.get('n'))}). "
            f"The reply says the wording taught for its node in {fmt(adherence.get('rate'))} of "
            f"{fmt(adherence.get('n'))} refused requests, some planted wording in "
            f"{fmt(adherence.get('said_a_planted_wording'))}: clustering recovers what the model says; how far that "
            "is what it was taught is the organism's adherence on requests it was not trained on.")
    if taught:
        t_adh = taught.get("adherence") or {}
        text = (f"On the {fmt(taught.get('requests'))} requests the wordings were taught on (the organism's "
                f"unconditioned training refusals; {fmt(taught.get('refused'))} replies refused): ")
        if taught.get("ari") is None:
            text += esc(str(taught.get("note") or "not scored")) + "."
        else:
            text += (f"clustering recovers the taught groups at ARI {fmt(taught.get('ari'))} "
                     f"({fmt(taught.get('groups'))} groups, n = {fmt(taught.get('n'))}; exact texts: "
                     f"{fmt(taught.get('exact_text_ari'))}); the reply says its taught wording in "
                     f"{fmt(t_adh.get('rate'))} of {fmt(t_adh.get('n'))}.")
        parts.append(text)
    if not parts:
        return ""
    return "<p class='small'><b>Known answer (the organism's planted wordings).</b> " + " ".join(parts) + "</p>"
