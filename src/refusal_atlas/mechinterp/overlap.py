"""The overlap graph: which taxonomy nodes share a refusal direction, beyond their noise?

One graph node per taxonomy node (reliability, norm with CI, best layer, prompts), at one
(layer, position, method). An `overlap` edge joins two nodes when their overlap is significantly
above what noise explains: the bootstrap 95 % lower bound of the *noise-corrected* cosine
(`noise.py`: sampling noise and the shared harmless mean removed from the inner products, so
unrelated directions have expectation 0) exceeds `min_overlap` (default 0). Its weight is the raw
cosine; the edge also carries its interval, the corrected cosine with its interval, both nodes'
split-half floors, the chance null's 95th percentile and `distinct` (corrected upper bound < 1:
the two are not one direction seen twice).
The taxonomy's own parent→child edges are in the same `MultiGraph` with `kind="taxonomy"`.

`sibling_test` asks whether taxonomy siblings (nodes sharing a parent) overlap more than
non-siblings: the difference of mean cosines, against a null from permuting node labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import numpy as np

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_text
from refusal_atlas.lm.positions import Position, parse_position_label, position_label
from refusal_atlas.mechinterp.causal.files import write_figure
from refusal_atlas.mechinterp.directions import DirectionSet
from refusal_atlas.mechinterp.geometry import spectrum
from refusal_atlas.mechinterp.noise import cosine_report


def choose_layer(ds: DirectionSet, position: Position, method: str = "diff_means", max_depth: float = 0.8) -> int:
    """The layer with the highest mean reliability over nodes, among layers < max_depth of the model.

    (Arditi et al. select below 0.8 of the depth: the last layers word the output.)
    """
    rel = ds.noise.get(f"{method}/reliability")
    n_model = int(ds.meta.get("n_model_layers") or (max(ds.layers) + 1))
    allowed = [i for i, layer in enumerate(ds.layers) if layer < max_depth * n_model] or list(range(len(ds.layers)))
    if rel is None:
        return ds.layers[allowed[len(allowed) // 2]]
    score = rel[: len(ds.nodes), :, ds.position_index(position)].nanmean(0)
    best = max(allowed, key=lambda i: (float(score[i]), -i))
    return ds.layers[best]


def best_layers(ds: DirectionSet, position: Position, method: str = "diff_means") -> dict[str, int]:
    """Per node: the layer with the highest held-out AUROC (ties: higher reliability, then earlier)."""
    pi = ds.position_index(position)
    auroc = ds.meta.get("auroc", {})
    rel = ds.noise.get(f"{method}/reliability")
    out = {}
    for i, node in enumerate(ds.nodes):
        a = auroc.get(node, {}).get(position_label(ds.positions[pi]))
        keys = []
        for li, layer in enumerate(ds.layers):
            r = float(rel[i, li, pi]) if rel is not None else 0.0
            keys.append(((a[li] if a else 0.0), r, -layer))
        out[node] = ds.layers[max(range(len(keys)), key=lambda li: keys[li])]
    return out


def parents_map(ds: DirectionSet) -> dict[str, list[str]]:
    return {k: list(v) for k, v in ds.meta.get("taxonomy", {}).get("parents", {}).items()}


def sibling_test(cos: np.ndarray, nodes: list[str], parents: dict[str, list[str]], *,
                 n_perm: int = 10000, seed: int = 0) -> dict:
    """Permutation test: do nodes sharing a parent have higher cosines than other pairs?"""
    k = len(nodes)
    sib = np.zeros((k, k), dtype=bool)
    for i in range(k):
        for j in range(k):
            if i != j and set(parents.get(nodes[i], [])) & set(parents.get(nodes[j], [])):
                sib[i, j] = True
    off = ~np.eye(k, dtype=bool)
    non = off & ~sib
    result = {"n_sibling_pairs": int(sib.sum() // 2), "n_other_pairs": int(non.sum() // 2), "n_perm": n_perm}
    if not sib.any() or not non.any():
        with_parent = [n for n in nodes if parents.get(n)]
        why = ("no two of these nodes share a parent" + (" (they are all roots of the taxonomy)" if not with_parent
                                                        else "") if not sib.any() else
               "every pair of these nodes shares a parent")
        return {**result, "statistic": None, "p_value": None,
                "note": f"not run: {why}; the test compares sibling pairs with other pairs, so it needs at least "
                        "one of each (analyse sibling nodes, e.g. with more prompts per child node)"}
    observed = cos[sib].mean() - cos[non].mean()
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, k)), axis=1)
    permuted = cos[perms[:, :, None], perms[:, None, :]]  # [n_perm, k, k]
    null = permuted[:, sib].mean(1) - permuted[:, non].mean(1)
    p = (1 + np.sum(null >= observed - 1e-12)) / (1 + n_perm)
    return {**result, "statistic": float(observed), "mean_sibling_cos": float(cos[sib].mean()),
            "mean_other_cos": float(cos[non].mean()), "p_value": float(p)}


def overlap_graph(ds: DirectionSet, layer: int | None = None, position: Position = -1,
                  method: str = "diff_means", min_overlap: float = 0.0) -> nx.MultiGraph:
    """Build the graph (see the module docstring); `layer=None` picks `choose_layer`."""
    position = parse_position_label(position_label(position))
    layer = choose_layer(ds, position, method) if layer is None else layer
    li, pi = ds.layer_index(layer), ds.position_index(position)
    g = nx.MultiGraph(layer=layer, position=position_label(position), method=method, min_overlap=min_overlap,
                      model_id=str(ds.meta.get("model_id", "")))
    best = best_layers(ds, position, method)
    counts = ds.meta.get("n_prompts", {})
    parents = parents_map(ds)
    labels = ds.meta.get("taxonomy", {}).get("labels", {})
    n = ds.noise
    for node in ds.nodes:
        i = ds.node_index(node)
        attrs = {
            "label": str(labels.get(node, node)),
            "n_prompts": int(counts.get(node, 0)),
            "norm": float(ds.get(node, layer, position, method).norm()),
            "best_layer": int(best[node]),
            "parents": ";".join(parents.get(node, [])),
        }
        for key, name in (("reliability", "reliability"), ("split_half_mean", "split_half"),
                          ("split_half_p05", "split_half_p05")):
            if f"{method}/{key}" in n:
                attrs[name] = float(n[f"{method}/{key}"][i, li, pi])
        if f"{method}/norm_ci" in n:
            attrs["norm_ci_low"] = float(n[f"{method}/norm_ci"][i, li, pi, 0])
            attrs["norm_ci_high"] = float(n[f"{method}/norm_ci"][i, li, pi, 1])
        auroc = ds.meta.get("auroc", {}).get(node, {}).get(position_label(position))
        if auroc:
            attrs["auroc"] = float(auroc[li])
        g.add_node(node, **{k: v for k, v in attrs.items() if not _bad(v)})
    if f"{method}/cos" in n:
        for row in cosine_report(ds, layer, position, method):
            if not math.isnan(row.debiased_ci_low) and row.debiased_ci_low > min_overlap:
                attrs = {"kind": "overlap", "weight": row.cos, "ci_low": row.ci_low, "ci_high": row.ci_high,
                         "cos_debiased": row.cos_debiased, "debiased_ci_low": row.debiased_ci_low,
                         "debiased_ci_high": row.debiased_ci_high, "floor_a": row.floor_a,
                         "floor_b": row.floor_b, "null95": row.null95, "distinct": row.distinct}
                g.add_edge(row.a, row.b, key="overlap", **{k: v for k, v in attrs.items() if not _bad(v)})
    for node, ps in parents.items():
        for p in ps:
            if node in g and p in g:
                g.add_edge(p, node, key="taxonomy", kind="taxonomy", weight=1.0)
    return g


def _bad(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def overlap_report(ds: DirectionSet, g: nx.MultiGraph, chosen_by: str = "") -> dict:
    """JSON-ready summary: the graph, every pair beside its floors, the spectrum and the sibling test."""
    layer, position, method = g.graph["layer"], parse_position_label(g.graph["position"]), g.graph["method"]
    pairs = [dict(vars(r), overlaps=r.overlaps, above_null=r.above_null, distinct=r.distinct)
             for r in cosine_report(ds, layer, position, method)] if f"{method}/cos" in ds.noise else []
    cos = cosine_matrix_np(ds, layer, position, method)
    return {
        "layer": layer,
        "position": position_label(position),
        "method": method,
        "chosen_by": chosen_by,
        "spectrum": {**spectrum(ds.stack(layer, position, method)),
                     "note": "of the unit node directions at this layer and position: effective_rank = exp(entropy "
                             "of the squared singular values' shares), participation_ratio = (sum l)^2 / sum l^2, "
                             "first_component = share of the first; 1 = one shared direction, n_directions = "
                             "mutually orthogonal ones"},
        "model_id": ds.meta.get("model_id"),
        "model_revision": ds.meta.get("model_revision"),
        "edge_rule": "overlap edge when the noise-corrected cosine's bootstrap 95% lower bound > min_overlap "
                     f"({g.graph['min_overlap']}); weight = raw cosine",
        "nodes": [{"id": n, **d} for n, d in g.nodes(data=True)],
        "edges": [{"source": a, "target": b, **d} for a, b, d in g.edges(data=True)],
        "pairs": [{k: (None if _bad(v) else v) for k, v in p.items()} for p in pairs],
        "sibling_test": sibling_test(cos, ds.nodes, parents_map(ds)),
    }


def cosine_matrix_np(ds: DirectionSet, layer: int, position: Position, method: str) -> np.ndarray:
    v = ds.stack(layer, position, method)
    u = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (u @ u.T).double().numpy()


def write_overlap(ds: DirectionSet, out_dir: str | Path, layer: int | None = None, position: Position = -1,
                  method: str = "diff_means", min_overlap: float = 0.0, chosen_by: str = "") -> dict:
    """Write overlap.graphml, overlap.json, heatmap.png and graph.png; return the report. `chosen_by` says how
    the layer was chosen (recorded in overlap.json); `layer=None` picks `choose_layer`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(ds.nodes) < 2:
        raise AtlasError(f"{out}: an overlap graph needs at least two nodes with directions")
    g = overlap_graph(ds, layer, position, method, min_overlap)
    how = chosen_by or ("given" if layer is not None else "most reliable layer (choose_layer)")
    report = overlap_report(ds, g, how)
    atomic_write(out / "overlap.graphml", lambda tmp: nx.write_graphml(g, tmp))
    atomic_write_text(out / "overlap.json", json.dumps(report, indent=1))
    _heatmap(ds, g, out / "heatmap.png")
    _graph_figure(g, out / "graph.png")
    return report


def _heatmap(ds: DirectionSet, g: nx.MultiGraph, path: Path) -> None:
    # heavy dependency (slow to import), loaded only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # heavy dependency (slow to import), loaded only when this runs
    import matplotlib.pyplot as plt

    layer, position, method = g.graph["layer"], parse_position_label(g.graph["position"]), g.graph["method"]
    cos = cosine_matrix_np(ds, layer, position, method)
    key = f"{method}/split_half_mean"
    if key in ds.noise:  # the diagonal shows each node's own split-half floor
        li, pi = ds.layer_index(layer), ds.position_index(position)
        np.fill_diagonal(cos, ds.noise[key][: len(ds.nodes), li, pi].numpy())
    k = len(ds.nodes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * k, 1.0 + 0.45 * k))
    im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(k), ds.nodes, rotation=90, fontsize=7)
    ax.set_yticks(range(k), ds.nodes, fontsize=7)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(f"{method} cosine, layer {layer}, position {position_label(position)}\n(diagonal: split-half floor)",
                 fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    try:
        write_figure(fig, path)
    finally:
        plt.close(fig)


def _graph_figure(g: nx.MultiGraph, path: Path) -> None:
    # heavy dependency (slow to import), loaded only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # heavy dependency (slow to import), loaded only when this runs
    import matplotlib.pyplot as plt

    simple = nx.Graph()
    simple.add_nodes_from(g.nodes)
    for a, b, d in g.edges(data=True):
        if d.get("kind") == "overlap":
            simple.add_edge(a, b, weight=max(float(d["weight"]), 0.01))
    pos = nx.spring_layout(simple, seed=0, weight="weight")
    fig, ax = plt.subplots(figsize=(7, 6))
    overlap = [(a, b, d) for a, b, d in g.edges(data=True) if d.get("kind") == "overlap"]
    tax = [(a, b) for a, b, d in g.edges(data=True) if d.get("kind") == "taxonomy"]
    nx.draw_networkx_edges(g, pos, edgelist=tax, style="dashed", edge_color="grey", ax=ax)
    if overlap:
        nx.draw_networkx_edges(g, pos, edgelist=[(a, b) for a, b, _ in overlap],
                               width=[1 + 4 * max(float(d["weight"]), 0) for *_, d in overlap],
                               edge_color=[float(d["weight"]) for *_, d in overlap], edge_cmap=plt.cm.viridis,
                               edge_vmin=0, edge_vmax=1, ax=ax)
    sizes = [300 + 900 * float(d.get("reliability", 0.5)) for _, d in g.nodes(data=True)]
    nx.draw_networkx_nodes(g, pos, node_size=sizes, node_color="#f2c14e", ax=ax)
    nx.draw_networkx_labels(g, pos, font_size=7, ax=ax)
    ax.set_title(f"overlap graph ({g.graph['method']}, layer {g.graph['layer']}, position {g.graph['position']});"
                 "\nedges: noise-corrected cosine significantly > 0; dashed: taxonomy", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    try:
        write_figure(fig, path)
    finally:
        plt.close(fig)

