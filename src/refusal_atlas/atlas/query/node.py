"""`node_report`: everything the atlas knows about one taxonomy node."""

from __future__ import annotations

from typing import Any

from refusal_atlas.atlas.query.common import _clean, _records, _require_node, analysed_fallback, selected_layer_position
from refusal_atlas.atlas.query.feature import node_sae
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.taxonomy.resolve import default_behaviour, effective_rules


def node_report(store: AtlasStore, node_id: str, *, nearest: int = 5) -> dict[str, Any]:
    """Everything the atlas knows about one node (see the module docstring)."""
    _require_node(store, node_id)
    out: dict[str, Any] = {"node": node_id, "label": store.node_label(node_id)}
    tax = store.taxonomy
    if tax is not None and node_id in tax.nodes:
        node = tax.nodes[node_id]
        out.update({
            "definition": node.definition, "broader": list(node.broader), "status": node.status.value,
            "default": default_behaviour(tax, node_id).value,
            "rules": [{"from": src, "when": dict(rule.when), "expect": rule.expect.value,
                       "rationale": rule.rationale} for src, rule in effective_rules(tax, node_id)],
        })
    fallback = analysed_fallback(store, node_id)
    out["fallback"] = fallback
    shown = fallback["ancestor"] if fallback and fallback["ancestor"] else node_id
    out["directions_of"] = shown
    out["directions"] = _node_directions(store, shown)
    out["direction_set"] = _set_name(out["directions"])
    record = next((r for r in store.coverage if r.get("node") == shown), {})
    out["same_prompts_as"] = record.get("same_prompts_as")  # its kept prompts are all one child's
    out["best"] = _best_direction(out["directions"], selected_layer_position(store))
    out["best_by"] = _best_by(out["best"])
    out["nearest"] = _nearest(store, shown, nearest, out["best"])
    out["clusters"] = [
        {"cluster": c.id, "label": c.label, "size": c.size, "score": score, "rank": rank}
        for c in store.clusters for rank, (n, score) in enumerate(c.linked_nodes) if n == node_id
    ]
    xa = store.cross_ablation
    out["cross_ablation"] = _records(xa[xa["ablated"].astype(str) == shown]) if xa is not None and \
        "ablated" in xa.columns else None
    ct = store.condition_table
    out["condition_table"] = _records(ct[ct["node"].astype(str) == node_id]) if ct is not None and \
        "node" in ct.columns else None
    out["sae"] = node_sae(store, shown)
    adh = store.adherence_by_node
    out["adherence"] = _records(adh[adh["node"].astype(str) == node_id]) if adh is not None and \
        "node" in adh.columns else None
    return _clean(out)


def _node_directions(store: AtlasStore, node_id: str) -> list[dict[str, Any]] | None:
    df = store.direction_metrics
    if df is None:
        return None
    rows = df[df["node"] == node_id]
    return _records(rows.drop(columns=["node"]))


def _set_name(rows: list[dict[str, Any]] | None) -> str | None:
    """Which direction set the rows come from: "branches" (causally tested) or "tree" (floors only)."""
    return str(rows[0].get("set")) if rows and rows[0].get("set") else None


def _best_direction(rows: list[dict[str, Any]] | None,
                    selected: tuple[int, str] | None = None) -> dict[str, Any] | None:
    """The node's direction at the layer and position the causal stage selected (for the pooled direction,
    the one every causal test uses); without a selection, the most reliable one (`best_by` says which)."""
    if not rows:
        return None
    if selected is not None:
        hit = [r for r in rows if int(r["layer"]) == selected[0] and str(r["position"]) == selected[1]]
        if hit:
            return {**hit[0], "chosen_by": SELECTED}
    best = max(rows, key=lambda r: (r.get("reliability") or -1.0, r.get("norm") or 0.0))
    return {**best, "chosen_by": MOST_RELIABLE}


SELECTED = "causal selection: the layer and position selected for the pooled direction"
MOST_RELIABLE = "highest split-half reliability (no causal selection in this atlas)"


def _best_by(best: dict[str, Any] | None) -> str | None:
    return None if best is None else str(best.get("chosen_by"))


def _nearest(store: AtlasStore, node_id: str, k: int, best: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Neighbours in the overlap graph (weight = cosine); else cosines at the node's best layer."""
    g = store.overlap_graph
    if g is not None and node_id in g:
        rows = []
        for a, b, data in store.overlap_edges("overlap"):
            if node_id not in (a, b) or a == b:
                continue
            other = b if a == node_id else a
            weight = data.pop("weight", data.pop("cosine", None))
            if a != node_id:  # floors are stored per endpoint: name them from this node's side
                data["floor_a"], data["floor_b"] = data.get("floor_b"), data.get("floor_a")
            rows.append({"node": other, "label": store.node_label(other), "cosine": weight, "source": "overlap",
                         "layer": g.graph.get("layer"), "position": g.graph.get("position"),
                         **{k: v for k, v in data.items() if k not in ("id", "kind")}})
        rows.sort(key=lambda r: -(r["cosine"] if isinstance(r["cosine"], int | float) else -1))
        if rows:
            return rows[:k]
    ds = store.direction_set_of(node_id)
    if ds is None or best is None or node_id not in ds.nodes:
        return []
    layer, position = int(best["layer"]), str(best["position"])
    li, pi = ds.layer_index(layer), ds.position_index(position)
    depth = ds.meta.get("depth") or {}
    same = [n for n in ds.nodes if n != node_id and depth.get(n) == depth.get(node_id)]
    cos_t = ds.noise.get("diff_means/cos")
    deb_t, ci_t = ds.noise.get("diff_means/cos_debiased"), ds.noise.get("diff_means/cos_debiased_ci")
    me = ds.unit(node_id, layer, position)
    rows = []
    for other in same:
        i, j = ds.node_index(node_id), ds.node_index(other)
        cos = float(cos_t[i, j, li, pi]) if cos_t is not None else float(me @ ds.unit(other, layer, position))
        row = {"node": other, "label": store.node_label(other), "cosine": cos, "layer": layer, "position": position,
               "source": "directions", "noise_floor": _floor(store, other, layer, position)}
        if deb_t is not None and ci_t is not None:
            row["cos_debiased"] = float(deb_t[i, j, li, pi])
            row["debiased_ci_low"], row["debiased_ci_high"] = float(ci_t[i, j, li, pi, 0]), float(ci_t[i, j, li, pi, 1])
        rows.append(row)
    rows.sort(key=lambda r: -r["cosine"])
    return rows[:k]


def _floor(store: AtlasStore, node: str, layer: int, position: Any) -> float | None:
    df = store.direction_metrics
    if df is None:
        return None
    hit = df[(df["node"] == node) & (df["layer"] == int(layer)) & (df["position"] == str(position))]
    return None if hit.empty else _clean(hit.iloc[0]["noise_floor"])
