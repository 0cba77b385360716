"""The `tree` stage of `run`: directions and noise floors for every taxonomy node with enough prompts.

The `directions` stage analyses the largest branches (the causal tests need them, and their
budget caps how many); this stage extends the atlas to every node of the tree, at every depth,
that holds at least `min_prompts` harmful training prompts whose policy is refuse (its own and
its descendants', along primary paths: `mechinterp.tree`). It reuses what the directions stage
already paid for: the prompts it captured and behaviour-filtered are read back from its capture
folder, and only the prompts a node still lacks (up to `per_node_train` per node, plus a few
spares) are behaviour-filtered and captured. Causal tests stay at branch level.

It writes `directions/tree/` (a `DirectionSet`: diff_means only) and `directions/coverage.json`,
one record per taxonomy node: how many harmful prompts it has, whether it was analysed and where
(branch set, tree set), and if not, why and which analysed ancestor answers for it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.runconfig import RunConfig, model_prompts, run_taxonomy
from refusal_atlas.atlas.stages import StageContext, stable_hash, write_json_atomic
from refusal_atlas.lm.capture import Activations, capture_activations, load_shards
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position
from refusal_atlas.mechinterp.directions import ROLES, DirectionSet
from refusal_atlas.mechinterp.request_form import request_forms
from refusal_atlas.mechinterp.scoring import behaves_as_labelled, behaviour_mask
from refusal_atlas.mechinterp.tree import counts_by_node, nearest_analysed, primary_path, tree_direction_set
from refusal_atlas.taxonomy.model import Taxonomy

__all__ = ["direction_pool", "stage_tree"]


def direction_pool(prompts: pd.DataFrame) -> pd.DataFrame:
    """Harmful training prompts whose policy is refuse and whose node is in the taxonomy (no condition)."""
    return prompts[prompts["harmful"] & (prompts["condition"] == "") & (prompts["expected"] == "refuse")
                   & (prompts["run_split"] == "train") & (prompts["analysis_node"] != "")]


def _paths(tax: Taxonomy, nodes: pd.Series) -> list[list[str]]:
    return [primary_path(tax, str(n)) for n in nodes]


def stage_tree(cfg: RunConfig, ctx: StageContext, model: Callable[[], LoadedModel]) -> dict[str, Any]:
    """The stage (see the module docstring); `model` loads the analysed model, called only when prompts
    beyond the directions stage's need the baseline-behaviour filter and a capture."""
    sizes, tax = cfg.sizes(), run_taxonomy(cfg)
    prompts = model_prompts(ctx.out, cfg)
    pool = direction_pool(prompts).sample(frac=1.0, random_state=cfg.seed).drop_duplicates("prompt")
    pool_paths = _paths(tax, pool["node"])
    train_counts = counts_by_node(pool_paths)
    candidates = [n for n, c in train_counts.items() if c >= cfg.min_prompts]

    dirs = ctx.out / schema.DIRECTIONS_DIR
    main = DirectionSet.load(dirs)
    branch = pd.read_parquet(dirs / schema.DIRECTION_PROMPTS.name)
    branch_acts = load_shards(_capture_folder(ctx))
    node_of = dict(zip(pool["prompt"], pool["node"], strict=True))
    captured = set(branch["prompt"])
    have = [p for p in branch[branch["harmful"].astype(bool)]["prompt"] if p in node_of]
    # cheaper than the branches (run budget): at most 2 x min_prompts new prompts per node and 2 spares
    quota, spare = min(sizes["per_node_train"], 2 * cfg.min_prompts), 2
    # Roots first, each node a random sample of its own subtree (the pool is shuffled): every prompt already
    # captured or picked for an ancestor is used (free), new ones only up to the quota. Picking deepest first
    # would make a parent little more than its deepest child's prompts.
    available = list(have)
    picks: dict[str, list[str]] = {}
    for node in sorted(candidates, key=lambda n: (len(primary_path(tax, n)), n)):
        inside = [p for p, path in zip(pool["prompt"], pool_paths, strict=True) if node in path]
        free = set(available)
        mine = [p for p in inside if p in free]
        new = [p for p in inside if p not in free and p not in captured][: max(0, quota + spare - len(mine))]
        picks[node] = mine + new
        available += new
    extras = [p for p in available if p not in captured]
    filtering: dict[str, Any] = {"candidates": len(extras)}
    extra_acts = None
    if extras:
        lm = model()
        behaves, refused = behaves_as_labelled(lm, extras, [True] * len(extras), max_new_tokens=8,
                                               batch_size=cfg.batch_size, progress=cfg.progress)
        keep, whole = behaviour_mask(behaves.tolist(), [tax.branch_of(node_of[p]) for p in extras], cfg.min_prompts)
        filtering.update({"harmful_not_refused": int((~refused).sum()), "unfiltered_nodes": whole})
        extras = [p for p, k in zip(extras, keep, strict=True) if k]
        if extras:
            folder = ctx.out / schema.ACTIVATIONS_DIR / stable_hash([lm.provenance(), extras])[:16]
            extra_acts = capture_activations(lm, extras, layers=branch_acts.layers, positions=branch_acts.positions,
                                             batch_size=32, out_dir=folder, progress=cfg.progress)

    # the tree's prompts: the branch set's (its harmless baseline included) and the extra ones
    harmless = branch[~branch["harmful"].astype(bool)]["prompt"].tolist()
    index = {p: i for i, p in enumerate(branch["prompt"])}

    def rows(texts: list[str]) -> torch.Tensor:
        return branch_acts.acts[torch.tensor([index[p] for p in texts], dtype=torch.long)]

    parts = [rows(have), *([extra_acts.acts] if extra_acts is not None else []), rows(harmless)]
    acts = Activations(torch.cat(parts), list(branch_acts.layers), list(branch_acts.positions), [],
                       dict(branch_acts.meta))
    texts = have + extras + harmless
    paths = [primary_path(tax, node_of[p]) for p in have + extras] + [[] for _ in harmless]
    harmful = [True] * (len(have) + len(extras)) + [False] * len(harmless)
    row_of = {p: i for i, p in enumerate(texts)}
    members = {n: [row_of[p] for p in ps if p in row_of] for n, ps in picks.items()}
    used = {n: len(rows) for n, rows in members.items()}
    analysed = [n for n in candidates if used.get(n, 0) >= cfg.min_prompts]
    if analysed:
        ds = tree_direction_set(acts, paths, harmful, analysed, members=members, strata=request_forms(texts),
                                seed=cfg.seed,
                                n_splits=30, n_boot=100,
                                floor_positions=_floor_positions(main, branch_acts.positions),
                                parents={n: list(tax[n].broader) for n in analysed},
                                labels={n: tax[n].label for n in analysed},
                                n_model_layers=main.meta.get("n_model_layers"))
        ds.meta["model"] = main.meta.get("model")
        ds.save(ctx.out / schema.TREE_DIR)
    elif (ctx.out / schema.TREE_DIR).is_dir():  # an earlier run's tree set would describe other prompts
        shutil.rmtree(ctx.out / schema.TREE_DIR)
    records = coverage(tax, prompts, train_counts, used, analysed, main.nodes, cfg.min_prompts)
    # a parent whose kept prompts all come from one child has that child's direction: say so
    same = {n: m for n in analysed for m in analysed if m != n and len(primary_path(tax, m)) > len(primary_path(tax, n))
            and sorted(members[n]) == sorted(members[m])}
    for r in records:
        r["same_prompts_as"] = same.get(r["node"])
    write_json_atomic(ctx.out / schema.COVERAGE_JSON.path,
                      {"min_prompts": cfg.min_prompts, "rule": COVERAGE_RULE, "nodes": records})
    return {"nodes": analysed, "n_analysed": len(analysed), "n_candidates": len(candidates),
            "n_with_directions": sum(1 for r in records if r["analysed"]), "extra_prompts": len(extras),
            "behaviour_filter": filtering, "not_analysed": sum(1 for r in records if not r["analysed"])}


def _floor_positions(main: DirectionSet, captured: list[Position]) -> list[Position]:
    """Where the tree's noise floors are estimated: the positions the atlas reads a direction at (the refusal
    position, which the causal stage selects at, and the harmfulness one), not all captured ones (cost)."""
    roles = [p for p in (main.meta.get("roles") or ROLES).values() if p in captured]
    return list(dict.fromkeys(roles)) or list(captured)


def _capture_folder(ctx: StageContext) -> Path:
    """The directions stage's capture folder: the one inside this output folder (a moved or copied atlas keeps
    its captures), else the path the stage recorded."""
    recorded = Path(str(ctx.results.get("directions", {}).get("activations", "")))
    inside = ctx.out / schema.ACTIVATIONS_DIR / recorded.name
    return inside if recorded.name and inside.is_dir() else recorded


COVERAGE_RULE = ("a node is analysed when at least min_prompts harmful training prompts whose policy is refuse, its "
                 "own or its descendants' along primary paths, remain after the baseline-behaviour filter; branch "
                 "directions (directions/) also carry the causal tests, tree directions (directions/tree/) do not")


def coverage(tax: Taxonomy, prompts: pd.DataFrame, train_counts: dict[str, int], used: dict[str, int],
             analysed: list[str], branch_nodes: list[str], min_prompts: int) -> list[dict[str, Any]]:
    """One record per taxonomy node: prompt counts, where it was analysed, else why not and its fallback."""
    plain = prompts[prompts["harmful"] & (prompts["condition"] == "") & (prompts["node"].astype(str) != "")]
    all_counts = counts_by_node(_paths(tax, plain.drop_duplicates("prompt")["node"]))
    with_dirs = set(analysed) | set(branch_nodes)
    rows = []
    for node in tax.nodes:
        n_all, n_train, n_used = all_counts.get(node, 0), train_counts.get(node, 0), used.get(node, 0)
        where = [name for name, nodes in (("branches", branch_nodes), ("tree", analysed)) if node in nodes]
        if where:
            reason = None
        elif n_train == 0:
            reason = ("no harmful prompt of the run is filed under it" if n_all == 0 else
                      f"{n_all} harmful prompt(s), none of them a training prompt whose policy is refuse")
        elif n_train < min_prompts:
            reason = f"{n_train} harmful training prompt(s) (< {min_prompts})"
        else:
            reason = (f"{n_train} harmful training prompts, but only {n_used} kept after the baseline-behaviour filter "
                      f"(< {min_prompts})")
        rows.append({"node": node, "depth": len(primary_path(tax, node)) - 1, "harmful_prompts": n_all,
                     "train_prompts": n_train, "used_prompts": n_used, "analysed": bool(where), "in": where,
                     "reason": reason, "fallback": None if where else nearest_analysed(tax, node, with_dirs)})
    return rows
