"""Questions a researcher asks the atlas, as functions returning plain JSON-ready dicts.

- `node_report(store, id)`: a node's directions per layer and position with their reliability,
  its nearest nodes by overlap, its clusters, its cross-ablation row and its conditions;
- `rank_direction(store, vector)`: which harm sources does an arbitrary direction (from this or
  another tool) correspond to? Cosine with every node's direction, beside that node's noise floor;
- `source_report(store, "llamaguard3:S9")`: an external category -> our nodes -> their directions;
- `sparql(store, query)`: SELECT / ASK / CONSTRUCT over atlas.ttl.

The CLI (`refusal-atlas query ...`) renders these dicts as tables or prints them as JSON.

How to read a direction match: a node's *noise floor* is the mean split-half cosine of its own
direction (two halves of its prompts); its *ceiling* `sqrt(reliability)` is the cosine a perfect,
noise-free copy of the node's true direction would be expected to reach with the stored estimate.
`match = cosine / ceiling` therefore near 1 means "as close as the data allow".
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.errors import AtlasError

VECTOR_SUFFIXES = (".safetensors", ".npy", ".pt", ".pth")


def _clean(value: Any) -> Any:
    """JSON-safe scalars (NaN -> None, numpy -> python)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def _records(df) -> list[dict[str, Any]]:
    return [] if df is None else [_clean(r) for r in df.to_dict("records")]


def _require_node(store: AtlasStore, node_id: str) -> None:
    known: set[str] = set()
    if store.taxonomy is not None:
        known |= set(store.taxonomy.nodes)
    if store.directions is not None:
        known |= set(store.directions.nodes)
    if not known:
        store.require("taxonomy (taxonomy.ttl) or directions", False)
    if node_id not in known:
        close = difflib.get_close_matches(node_id, sorted(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `refusal-atlas taxonomy show` lists them"
        raise AtlasError(f"node {node_id!r} is not in this atlas{hint}")


# ------------------------------------------------------------------------------------ node
def node_report(store: AtlasStore, node_id: str, *, nearest: int = 5) -> dict[str, Any]:
    """Everything the atlas knows about one node (see the module docstring)."""
    _require_node(store, node_id)
    out: dict[str, Any] = {"node": node_id, "label": store.node_label(node_id)}
    tax = store.taxonomy
    if tax is not None and node_id in tax.nodes:
        from refusal_atlas.taxonomy.resolve import default_behaviour, effective_rules

        node = tax.nodes[node_id]
        out.update({
            "definition": node.definition, "broader": list(node.broader), "status": node.status.value,
            "default": default_behaviour(tax, node_id).value,
            "rules": [{"from": src, "when": dict(rule.when), "expect": rule.expect.value,
                       "rationale": rule.rationale} for src, rule in effective_rules(tax, node_id)],
        })
    out["directions"] = _node_directions(store, node_id)
    out["best"] = _best_direction(out["directions"])
    out["nearest"] = _nearest(store, node_id, nearest, out["best"])
    out["clusters"] = [
        {"cluster": c.id, "label": c.label, "size": c.size, "score": score, "rank": rank}
        for c in store.clusters for rank, (n, score) in enumerate(c.linked_nodes) if n == node_id
    ]
    xa = store.cross_ablation
    out["cross_ablation"] = _records(xa[xa["ablated"].astype(str) == node_id]) if xa is not None and \
        "ablated" in xa.columns else None
    ct = store.condition_table
    out["condition_table"] = _records(ct[ct["node"].astype(str) == node_id]) if ct is not None and \
        "node" in ct.columns else None
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


def _best_direction(rows: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The selected (layer, position) if the causal stage chose one, else the most reliable."""
    if not rows:
        return None
    chosen = [r for r in rows if r.get("selected") in (True, 1, "true", "True")]
    if chosen:
        return chosen[0]
    return max(rows, key=lambda r: (r.get("reliability") or -1.0, r.get("norm") or 0.0))


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
    ds = store.directions
    if ds is None or best is None or node_id not in ds.nodes:
        return []
    layer, position = int(best["layer"]), best["position"]
    me = ds.unit(node_id, layer, position)
    rows = []
    for other in ds.nodes:
        if other == node_id:
            continue
        cos = float(me @ ds.unit(other, layer, position))
        rows.append({"node": other, "label": store.node_label(other), "cosine": cos, "layer": layer,
                     "position": position, "source": "directions",
                     "noise_floor": _floor(store, other, layer, position)})
    rows.sort(key=lambda r: -r["cosine"])
    return rows[:k]


def _floor(store: AtlasStore, node: str, layer: int, position: Any) -> float | None:
    df = store.direction_metrics
    if df is None:
        return None
    hit = df[(df["node"] == node) & (df["layer"] == int(layer)) & (df["position"] == str(position))]
    return None if hit.empty else _clean(hit.iloc[0]["noise_floor"])


# ------------------------------------------------------------------------------------ direction
def load_vector(path: str | Path, key: str | None = None) -> torch.Tensor:
    """A direction from safetensors, .npy or .pt (torch.load(weights_only=True)); [d] or [layers, d]."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in VECTOR_SUFFIXES:
        raise AtlasError(f"{path}: unsupported vector format {suffix!r}; use .safetensors, .npy or .pt")
    try:
        if suffix == ".npy":
            obj: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # each loader raises its own types for corrupt files
        raise AtlasError(f"{path}: could not read a tensor ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if key is not None:
            if key not in tensors:
                raise AtlasError(f"{path}: no tensor {key!r}; keys: {', '.join(sorted(tensors)[:20])}")
            obj = tensors[key]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise AtlasError(f"{path}: {len(tensors)} tensors; choose one with --key "
                             f"({', '.join(sorted(tensors)[:10])}{', ...' if len(tensors) > 10 else ''})")
    if not isinstance(obj, torch.Tensor):
        raise AtlasError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
    vec = obj.detach().to(torch.float32).squeeze()
    if vec.dim() not in (1, 2) or vec.numel() == 0:
        raise AtlasError(f"{path}: expected shape [d_model] or [layers, d_model], got {list(obj.shape)}")
    if not torch.isfinite(vec).all():
        raise AtlasError(f"{path}: the vector contains NaN or infinite values")
    return vec


def rank_direction(
    store: AtlasStore,
    vector: torch.Tensor,
    *,
    layer: int | None = None,
    position: str | int | None = None,
    method: str = "diff_means",
    source: str = "vector",
) -> dict[str, Any]:
    """Rank the atlas's nodes by cosine with `vector` ([d] or [layers, d]), with their noise floors.

    A [layers, d] input is read row by row at the atlas's layers (rows indexed by model layer, or
    by the atlas's own layer list when it has exactly that many rows). Without `--layer` each node
    is compared at every layer and its best layer reported.
    """
    ds = store.directions
    store.require("directions (directions/directions.json)", ds is not None)
    from refusal_atlas.lm.positions import canonical_position, position_label

    if method not in ds.methods:
        raise AtlasError(f"method {method!r} is not in this atlas; choose from {', '.join(ds.methods)}")
    d_model = next(iter(ds.tensors.values())).shape[-1]
    if vector.shape[-1] != d_model:
        model = ds.meta.get("model_id", "the atlas model")
        raise AtlasError(f"{source}: the vector has d={vector.shape[-1]} but this atlas's directions have "
                         f"d_model={d_model} ({model}); use a direction from the same model")
    if position is None:
        roles = ds.meta.get("roles") or {}
        wanted = roles.get("refusal", -1)
        position = wanted if wanted in ds.positions else ds.positions[0]
    pos = canonical_position(position)
    ds.position_index(pos)
    layers = [layer] if layer is not None else list(ds.layers)
    for lyr in layers:
        ds.layer_index(lyr)
    rows_by_layer = _rows_for_layers(vector, layers, ds.layers, source)
    results = []
    pooled = None
    for node in ds.nodes_with_pooled:
        best: dict[str, Any] | None = None
        for lyr in layers:
            q = rows_by_layer[lyr]
            try:
                target = ds.get(node, lyr, pos, method)
            except AtlasError:
                continue
            denom = float(q.norm() * target.norm())
            cos = float(q @ target) / denom if denom > 0 else float("nan")
            if best is None or (not math.isnan(cos) and cos > best["cosine"]):
                best = {"node": node, "cosine": cos, "layer": int(lyr), "position": position_label(pos)}
        if best is None:
            continue
        floor_t, rel_t = ds.noise.get(f"{method}/split_half_mean"), ds.noise.get(f"{method}/reliability")
        if floor_t is not None and rel_t is not None:
            idx = (ds.node_index(node), ds.layer_index(best["layer"]), ds.position_index(pos))
            floor, rel = float(floor_t[idx]), float(rel_t[idx])
            best["noise_floor"] = _clean(floor)
            best["reliability"] = _clean(rel)
            ceiling = math.sqrt(rel) if not math.isnan(rel) and rel > 0 else None
            best["ceiling"] = ceiling
            best["match"] = best["cosine"] / ceiling if ceiling else None
        if node in getattr(ds, "nodes", []):
            best["label"] = store.node_label(node)
            results.append(best)
        else:
            pooled = best
    results.sort(key=lambda r: -r["cosine"] if not math.isnan(r["cosine"]) else math.inf)
    for rank, row in enumerate(results, start=1):
        row["rank"] = rank
    return _clean({"source": source, "shape": list(vector.shape), "method": method,
                   "layers": layers, "position": position_label(pos), "pooled": pooled, "ranking": results})


def _rows_for_layers(vector: torch.Tensor, layers: list[int], atlas_layers: list[int],
                     source: str) -> dict[int, torch.Tensor]:
    if vector.dim() == 1:
        return dict.fromkeys(layers, vector)
    n = vector.shape[0]
    if n == len(atlas_layers) and n <= max(atlas_layers):
        index = {lyr: atlas_layers.index(lyr) for lyr in layers}  # one row per atlas layer
    else:
        index = {lyr: lyr for lyr in layers}
    bad = [lyr for lyr, i in index.items() if i >= n]
    if bad:
        raise AtlasError(f"{source}: the vector has {n} layer rows but layer(s) {bad} were asked for; "
                         "pass --layer with a row that exists or a [d_model] vector")
    return {lyr: vector[i] for lyr, i in index.items()}


# ------------------------------------------------------------------------------------ source
def source_report(store: AtlasStore, curie: str) -> dict[str, Any]:
    """An external category (e.g. `llamaguard3:S9`) -> our nodes (crosswalks) -> their directions."""
    rows = store.crosswalks
    hits = [r for r in rows if r[2] == curie]
    if not hits:
        known = sorted({r[2] for r in rows})
        close = difflib.get_close_matches(curie, known, n=3)
        prefix = curie.split(":", 1)[0]
        same = [k for k in known if k.startswith(prefix + ":")]
        hint = (f"did you mean {', '.join(close)}?" if close else
                f"known {prefix}: categories: {', '.join(same[:15])}" if same else
                f"known prefixes: {', '.join(sorted({k.split(':', 1)[0] for k in known}))}")
        raise AtlasError(f"{curie!r} is mapped to no node of this atlas; {hint}")
    tax = store.taxonomy
    dm = store.direction_metrics
    with_dirs = set(dm["node"]) if dm is not None else set()
    nodes = []
    seen: set[str] = set()
    for node, predicate, _, _ in hits:
        targets = [(node, None)]
        if tax is not None and node in tax.nodes:
            targets += [(d, node) for d in tax.descendants(node) if d in with_dirs]
        for target, via in targets:
            if target in seen:
                continue
            seen.add(target)
            entry: dict[str, Any] = {"node": target, "label": store.node_label(target), "predicate": predicate,
                                     "via": via}
            dirs = _node_directions(store, target)
            entry["best"] = _best_direction(dirs)
            entry["n_directions"] = len(dirs or [])
            nodes.append(entry)
    return _clean({"source": curie, "label": hits[0][3], "nodes": nodes,
                   "directions_available": dm is not None})


# ------------------------------------------------------------------------------------ sparql
def sparql(store: AtlasStore, query: str) -> dict[str, Any]:
    """SPARQL over atlas.ttl (else taxonomy.ttl); `query` may be a .rq/.sparql file.

    Runs through the ontology layer's offline runner: our prefixes are pre-bound and SERVICE /
    FROM clauses (which would make rdflib fetch IRIs) are refused.
    """
    from rdflib import Graph

    from refusal_atlas.ontology.io import parse_rdf
    from refusal_atlas.ontology.sparql import prepare, run_query

    path = store.atlas_ttl if store.atlas_ttl.is_file() else store.taxonomy_ttl
    store.require("atlas.ttl", path.is_file())
    text = query
    candidate = Path(query) if len(query) < 4096 and "\n" not in query else None
    if candidate is not None and candidate.suffix.lower() in (".rq", ".sparql", ".txt") and candidate.is_file():
        text = candidate.read_text(encoding="utf-8")
    graph = parse_rdf(path)
    result = run_query(graph, text)
    if isinstance(result, Graph):
        return {"type": "CONSTRUCT", "turtle": result.serialize(format="turtle")}
    if prepare(text, graph).algebra.name == "AskQuery":
        return {"type": "ASK", "answer": bool(result.rows[0][0])}
    records = result.records()
    return {"type": "SELECT", "vars": result.columns, "rows": [[r[c] for c in result.columns] for r in records]}
