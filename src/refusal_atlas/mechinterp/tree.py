"""Directions for every node of the taxonomy tree with enough prompts, not only for the branches.

A harmful prompt is filed under its node and every node on its *primary path* (root → … → node,
following first-listed parents, as `Taxonomy.branch_of` does), so a node's prompts are its own
plus its descendants'. Nested groups cannot share one `Groups` (the noise estimates assume
disjoint groups), so the tree is analysed one depth at a time: at depth d every prompt belongs
to the depth-d node of its path (a partition), prompts whose depth-d node is not analysed stay
in the pooled set only, and `extract_directions`' own code gives the directions, their
split-half floors, bootstrap intervals and the chance null. The levels are then merged into one
`DirectionSet` whose cross-node arrays are NaN between nodes of different depths (a node and its
ancestor share prompts, so their cosine has no independent-noise floor). Only `diff_means` is
computed (the vs_other and residual variants stay at branch level, where the causal tests are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from refusal_atlas.lm.capture import Activations
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet, Groups, compute_directions
from refusal_atlas.mechinterp.noise import noise_floor
from refusal_atlas.mechinterp.probes import auroc_profile
from refusal_atlas.taxonomy.model import Taxonomy

__all__ = ["TREE_METHOD", "counts_by_node", "level_labels", "nearest_analysed", "primary_path", "tree_direction_set"]

TREE_METHOD = "diff_means"


def primary_path(tax: Taxonomy, node: str) -> list[str]:
    """Root first, ending at `node`, following first-listed parents (empty for an unknown node)."""
    if node not in tax.nodes:
        return []
    path = [node]
    while True:
        parents = [p for p in tax.nodes[path[-1]].broader if p in tax.nodes]
        if not parents or parents[0] in path:
            return path[::-1]
        path.append(parents[0])


def nearest_analysed(tax: Taxonomy, node: str, analysed: set[str] | Sequence[str]) -> str | None:
    """The nearest ancestor on the node's primary path that has a direction, or None."""
    wanted = set(analysed)
    return next((a for a in reversed(primary_path(tax, node)[:-1]) if a in wanted), None)


def level_labels(paths: Sequence[Sequence[str]], depth: int, analysed: set[str]) -> list[str]:
    """Each prompt's node at `depth` (0 = root) when that node is analysed, else "" (pooled only)."""
    return [p[depth] if len(p) > depth and p[depth] in analysed else "" for p in paths]


def tree_direction_set(
    acts: Activations,
    paths: Sequence[Sequence[str]],
    harmful: Sequence[bool],
    analysed: Sequence[str],
    *,
    strata: Sequence[str] | None = None,
    seed: int = 0,
    n_splits: int = 50,
    n_boot: int = 200,
    n_perm: int = 100,
    floor_positions: Sequence[Position] | None = None,
    members: Mapping[str, Sequence[int]] | None = None,
    parents: dict[str, list[str]] | None = None,
    labels: dict[str, str] | None = None,
    n_model_layers: int | None = None,
) -> DirectionSet:
    """One merged `DirectionSet` over every depth (see the module docstring); `paths[i]` is prompt i's
    primary path ([] for a harmless prompt), `analysed` the nodes to give directions. Directions and AUROC
    are computed at every captured position; the noise estimates (the costly part) at `floor_positions`
    only (None: all), NaN elsewhere. `members` (node -> prompt indices) restricts each node to the prompts
    sampled for it (None: every prompt on a path through it), so a parent is not just its deepest child."""
    wanted = set(analysed)
    chosen = {n: set(v) for n, v in members.items()} if members is not None else None
    depth_of = {n: p.index(n) for p in paths for n in p if n in wanted}
    levels = sorted(set(depth_of.values()))
    floor_at = [acts.position_index(p) for p in floor_positions] if floor_positions is not None else \
        list(range(len(acts.positions)))
    sets: list[tuple[int, DirectionSet]] = []
    for depth in levels:
        names = level_labels(paths, depth, wanted)
        if chosen is not None:
            names = [n if n and i in chosen.get(n, set()) else "" for i, n in enumerate(names)]
        # below the roots, harmful prompts of unanalysed nodes would only feed the pooled direction (kept from
        # depth 0 alone), so they are left out: each level costs in proportion to the prompts it holds
        keep = [i for i, (n, h) in enumerate(zip(names, harmful, strict=True)) if n or not h or depth == levels[0]]
        index = torch.tensor(keep, dtype=torch.long)
        sub = Activations(acts.acts[index], acts.layers, acts.positions, [], acts.meta)
        names_k, harmful_k = [names[i] for i in keep], [harmful[i] for i in keep]
        strata_k = [strata[i] for i in keep] if strata is not None else None
        ds = compute_directions(sub, names_k, harmful_k, methods=(TREE_METHOD,), strata=strata_k)
        groups = Groups.from_labels(names_k, harmful_k, strata=strata_k)
        at = Activations(sub.acts[:, :, floor_at], acts.layers, [acts.positions[j] for j in floor_at], [], acts.meta)
        noise = noise_floor(at, groups, methods=(TREE_METHOD,), n_splits=n_splits, n_boot=n_boot, n_perm=n_perm,
                            seed=seed + depth)
        ds.noise = {k: _spread(k, v, floor_at, len(acts.positions)) for k, v in noise.items()}
        ds.meta["noise"] = {"n_splits": n_splits, "n_boot": n_boot, "n_perm": n_perm, "seed": seed + depth,
                            "positions": [position_label(acts.positions[j]) for j in floor_at],
                            "interval": "basic bootstrap 95%",
                            "reliability": "Spearman-Brown of mean split-half cosine"}
        auroc = auroc_profile(sub, groups, seed=seed + depth)
        ds.meta["auroc"] = {node: {position_label(p): [round(float(x), 4) for x in a[:, j]]
                                   for j, p in enumerate(acts.positions)} for node, a in auroc.items()}
        sets.append((depth, ds))
    merged = _merge([ds for _, ds in sets])
    merged.meta["depth"] = {n: depth_of[n] for n in merged.nodes}
    merged.meta["levels"] = {str(d): list(ds.nodes) for d, ds in sets}
    merged.meta["tree"] = ("one direction set per depth of the primary path, merged; cross-node statistics only "
                           "between nodes of the same depth")
    if n_model_layers is not None:
        merged.meta["n_model_layers"] = n_model_layers
    if parents is not None:
        merged.meta["taxonomy"] = {"parents": {k: list(v) for k, v in parents.items() if k in merged.nodes},
                                   "labels": {k: v for k, v in (labels or {}).items() if k in merged.nodes}}
    return merged


def _merge(sets: list[DirectionSet]) -> DirectionSet:
    """Concatenate per-depth direction sets (disjoint node ids); cross-depth entries are NaN."""
    first = sets[0]
    nodes = [n for ds in sets for n in ds.nodes]
    k1 = len(nodes) + 1
    tensors: dict[str, Tensor] = {}
    noise: dict[str, Tensor] = {}
    n_prompts: dict[str, int] = {}
    auroc: dict[str, dict] = {}
    matching: dict[str, dict] = {}
    for ds in sets:
        # the pooled direction is the same at every depth (every harmful prompt counts in it): keep the first's
        tensors.update({k: v for k, v in ds.tensors.items() if f"/{POOLED}/" not in k or ds is first})
        n_prompts.update({k: int(v) for k, v in (ds.meta.get("n_prompts") or {}).items()
                          if k in ds.nodes or (k not in n_prompts and ds is first)})
        auroc.update(ds.meta.get("auroc") or {})
        shares = (ds.meta.get("harmless_matched_on") or {}).get("shares") or {}
        matching.update({k: v for k, v in shares.items() if k in ds.nodes})
        index = torch.tensor([nodes.index(n) for n in ds.nodes] + [k1 - 1])
        for key, value in ds.noise.items():
            if key not in noise:
                shape = list(value.shape)
                shape[0] = k1
                if _square(key):
                    shape[1] = k1
                noise[key] = torch.full(shape, float("nan"))
            if _square(key):
                noise[key][index[:, None], index[None, :]] = value
            else:
                noise[key][index] = value
    meta = {k: v for k, v in first.meta.items() if k not in ("n_prompts", "auroc", "harmless_matched_on")}
    meta.update({"n_prompts": n_prompts, "auroc": auroc})
    if matching:
        meta["harmless_matched_on"] = {**(first.meta.get("harmless_matched_on") or {}), "shares": matching}
    return DirectionSet(tensors, nodes, list(first.layers), list(first.positions), [TREE_METHOD], meta, noise)


def _spread(key: str, value: Tensor, at: list[int], n_positions: int) -> Tensor:
    """A noise array over some positions widened to all of them, NaN elsewhere (the position axis follows the
    node axes and the layer axis: 2, or 3 for the cross-node arrays)."""
    if len(at) == n_positions:
        return value
    axis = 3 if _square(key) else 2
    shape = list(value.shape)
    shape[axis] = n_positions
    out = torch.full(shape, float("nan"))
    index: list[slice | list[int]] = [slice(None)] * len(shape)
    index[axis] = at
    out[tuple(index)] = value
    return out


def _square(key: str) -> bool:
    """Noise arrays with a second node axis (cosines between nodes)."""
    stat = key.split("/", 1)[1]
    return stat.startswith("cos")


def counts_by_node(paths: Sequence[Sequence[str]]) -> dict[str, int]:
    """How many prompts each node holds, counting every node on each prompt's path."""
    out: dict[str, int] = {}
    for p in paths:
        for n in p:
            out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))
