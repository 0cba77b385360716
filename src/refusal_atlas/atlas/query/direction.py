"""`rank_direction`: which harm sources does an arbitrary direction correspond to, and is it above chance?"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from refusal_atlas.atlas.query.common import _clean, selected_layer_position
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.positions import Position, canonical_position, position_label
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet

NULL_DRAWS = 1000
NULL_SEED = 0
ALPHA = 0.05
MATCH_LEGEND = ("match = cosine / ceiling, where ceiling = sqrt(reliability) is the cosine a noise-free copy of "
                "the node's direction would reach with this estimate: ~1 = as close as the data allow, above 1 = "
                "within noise of a perfect match")
VECTOR_SUFFIXES = (".safetensors", ".npy", ".pt", ".pth")


def _check_vector(vec: torch.Tensor, source: str) -> None:
    """A direction must be finite and non-zero (a zero vector has no direction to compare)."""
    if not torch.isfinite(vec).all():
        raise AtlasError(f"{source}: the vector contains NaN or infinite values; pass a finite direction")
    norms = vec.reshape(-1, vec.shape[-1]).norm(dim=-1)
    if (norms == 0).any():
        rows = "" if vec.dim() == 1 else f" (row(s) {[int(i) for i in torch.nonzero(norms == 0).flatten()][:10]})"
        raise AtlasError(f"{source}: the vector is all zeros{rows}; a direction needs a non-zero vector")


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
    if not (obj.is_floating_point() or obj.dtype in (torch.int32, torch.int64, torch.int16, torch.int8)):
        raise AtlasError(f"{path}: expected a numeric tensor, got dtype {obj.dtype}")
    vec = obj.detach().to(torch.float32).squeeze()
    if vec.dim() not in (1, 2) or vec.numel() == 0:
        raise AtlasError(f"{path}: expected shape [d_model] or [layers, d_model], got {list(obj.shape)}")
    _check_vector(vec, str(path))
    return vec


def _search_space(store: AtlasStore, ds: DirectionSet, layer: int | None, position: str | int | None,
                  all_layers: bool) -> tuple[list[int], Position, str]:
    """The layers and position to compare at, and how they were chosen."""
    chosen = selected_layer_position(store)
    if position is None:
        if chosen is not None:
            position = chosen[1]
        else:
            wanted = (ds.meta.get("roles") or {}).get("refusal", -1)
            position = wanted if wanted in ds.positions else ds.positions[0]
    pos = canonical_position(position)
    ds.position_index(pos)
    if layer is not None:
        layers, how = [layer], "given (--layer)"
    elif all_layers:
        layers, how = list(ds.layers), "every layer (--all-layers), best per node"
    elif chosen is not None and chosen[0] in ds.layers:
        layers, how = [chosen[0]], "selected by the causal stage"
    else:
        layers, how = list(ds.layers), "every layer, best per node (no causal selection in this atlas)"
    for lyr in layers:
        ds.layer_index(lyr)
    return layers, pos, how


def chance_null(rows_by_layer: dict[int, torch.Tensor], targets: torch.Tensor, *, draws: int = NULL_DRAWS,
                seed: int = NULL_SEED) -> torch.Tensor:
    """Best cosine over the searched layers for `draws` random unit directions, per target: [n_targets, draws].

    `targets` is [n_targets, n_layers, d] (unit rows, NaN where a target has no direction). A query
    that is one [d] vector for every layer gets one random vector for every layer too; a [layers, d]
    query gets an independent random row per layer, as its rows are.
    """
    layers = list(rows_by_layer)
    shared = len({id(v) for v in rows_by_layer.values()}) == 1
    gen = torch.Generator().manual_seed(seed)
    d = targets.shape[-1]
    safe = torch.nan_to_num(targets, nan=0.0)
    out = []
    for start in range(0, draws, 200):
        n = min(200, draws - start)
        rand = torch.randn(n, 1 if shared else len(layers), d, generator=gen)
        rand = rand / rand.norm(dim=-1, keepdim=True)
        cos = torch.einsum("nld,tld->tnl", rand.expand(n, len(layers), d), safe)
        out.append(cos.max(dim=-1).values)
    return torch.cat(out, dim=1)


def rank_direction(
    store: AtlasStore,
    vector: torch.Tensor,
    *,
    layer: int | None = None,
    position: str | int | None = None,
    method: str = "diff_means",
    source: str = "vector",
    all_layers: bool = False,
    draws: int = NULL_DRAWS,
    seed: int = NULL_SEED,
) -> dict[str, Any]:
    """Rank the atlas's nodes by cosine with `vector` ([d] or [layers, d]), with floors and a chance baseline.

    By default the comparison is at the causally selected layer and position (every layer, best per
    node, where the atlas has no selection or `all_layers` is set). A [layers, d] input is read row by
    row at the atlas's layers (rows indexed by model layer, or by the atlas's own layer list when it
    has exactly that many rows). Each row carries `p_value` (against `draws` seeded random unit
    directions, taking the best over the same layers) and `above_chance` (p < 0.05).
    """
    ds = store.directions
    store.require("directions (directions/directions.json)", ds is not None)
    assert ds is not None
    if method not in ds.methods:
        raise AtlasError(f"method {method!r} is not in this atlas; choose from {', '.join(ds.methods)}")
    vector = vector.detach().to(torch.float32)
    if vector.dim() not in (1, 2) or vector.numel() == 0:
        raise AtlasError(f"{source}: expected shape [d_model] or [layers, d_model], got {list(vector.shape)}")
    d_model = next(iter(ds.tensors.values())).shape[-1]
    if vector.shape[-1] != d_model:
        model = ds.meta.get("model_id", "the atlas model")
        raise AtlasError(f"{source}: the vector has d={vector.shape[-1]} but this atlas's directions have "
                         f"d_model={d_model} ({model}); use a direction from the same model")
    layers, pos, how = _search_space(store, ds, layer, position, all_layers)
    rows_by_layer = _rows_for_layers(vector, layers, ds.layers, source)
    for lyr, row in rows_by_layer.items():
        _check_vector(row, f"{source} (layer {lyr})")
    # every analysed node: the branch set's (with the pooled direction), then the tree set's others
    tree = store.tree_directions
    sets = [(n, ds) for n in ds.nodes_with_pooled] + \
        ([(n, tree) for n in tree.nodes if n not in ds.nodes] if tree is not None and tree.layers == ds.layers else [])
    sets = [(n, s) for n, s in sets if _has(s, n, pos, method)]
    names = [n for n, _ in sets]
    targets = torch.full((len(names), len(layers), d_model), float("nan"))
    for t, (node, src) in enumerate(sets):
        for j, lyr in enumerate(layers):
            v = src.get(node, lyr, pos, method)
            if float(v.norm()) > 0:
                targets[t, j] = v / v.norm()
    queries = torch.stack([rows_by_layer[lyr] / rows_by_layer[lyr].norm() for lyr in layers])  # [L, d]
    cos = torch.einsum("ld,tld->tl", queries, targets)  # NaN where a target is missing
    null = chance_null(rows_by_layer, targets, draws=draws, seed=seed)
    # the family: a random direction's best cosine over every ranked node as well (their directions are
    # correlated, so this is tighter than Bonferroni); without it ~5% of the nodes of any vector look significant
    in_family = torch.tensor([n != POOLED for n in names], dtype=torch.bool)
    family = null[in_family].amax(0) if bool(in_family.any()) else null.amax(0)
    results: list[dict[str, Any]] = []
    pooled: dict[str, Any] | None = None
    for t, (node, src) in enumerate(sets):
        floor_t, rel_t = src.noise.get(f"{method}/split_half_mean"), src.noise.get(f"{method}/reliability")
        row_cos = cos[t]
        if torch.isnan(row_cos).all():
            continue
        j = int(torch.nan_to_num(row_cos, nan=-2.0).argmax())
        best: dict[str, Any] = {"node": node, "cosine": float(row_cos[j]), "layer": int(layers[j]),
                                "position": position_label(pos)}
        observed = row_cos[j]
        best["p_node"] = float((1 + (null[t] >= observed).sum()) / (draws + 1))
        best["p_value"] = float((1 + (family >= observed).sum()) / (draws + 1)) if node != POOLED else best["p_node"]
        best["above_chance"] = best["p_value"] < ALPHA
        best["chance_cosine_95"] = float(torch.quantile(family if node != POOLED else null[t], 0.95))
        if floor_t is not None and rel_t is not None:
            idx = (src.node_index(node), src.layer_index(best["layer"]), src.position_index(pos))
            floor, rel = float(floor_t[idx]), float(rel_t[idx])
            best["noise_floor"] = _clean(floor)
            best["reliability"] = _clean(rel)
            ceiling = math.sqrt(rel) if not math.isnan(rel) and rel > 0 else None
            best["ceiling"] = ceiling
            best["match"] = best["cosine"] / ceiling if ceiling else None
        if node != POOLED:
            best["label"] = store.node_label(node)
            best["set"] = "branches" if src is ds else "tree"
            results.append(best)
        else:
            pooled = best
    results.sort(key=lambda r: -r["cosine"])
    for rank, ranked in enumerate(results, start=1):
        ranked["rank"] = rank
    chance = {"draws": draws, "seed": seed, "alpha": ALPHA,
              "n_searched": {"layers": len(layers), "positions": 1, "nodes": int(in_family.sum())},
              "rule": "p_value = share of seeded random unit directions in d_model whose best cosine over the "
                      "searched layers, the one position and every ranked node reaches the observed one (corrected "
                      "for all three searches); p_node = the same for this node alone; above_chance when "
                      "p_value < alpha; chance_cosine_95 = the cosine a random direction reaches 5% of the time"}
    return _clean({"source": source, "shape": list(vector.shape), "method": method, "layers": layers,
                   "layer_choice": how, "position": position_label(pos), "chance": chance,
                   "match_legend": MATCH_LEGEND, "pooled": pooled, "ranking": results})


def _has(ds: DirectionSet, node: str, pos: Position, method: str) -> bool:
    try:
        ds.all_layers(node, pos, method)
    except AtlasError:
        return False
    return True


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
