"""Directions for every node of the tree: primary paths, one partition per depth, planted truths recovered."""

from __future__ import annotations

import math

import torch

from refusal_atlas.lm.capture import Activations
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.mechinterp.tree import (
    counts_by_node,
    level_labels,
    nearest_analysed,
    primary_path,
    tree_direction_set,
)
from refusal_atlas.taxonomy.model import Taxonomy


def _tax() -> Taxonomy:
    return Taxonomy.model_validate({
        "scheme": {"id": "t", "title": "t", "namespace": "https://example.org/t/"},
        "nodes": {
            "a": {"id": "a", "label": "A", "definition": "a", "expect": "refuse"},
            "a.x": {"id": "a.x", "label": "AX", "definition": "ax", "broader": ["a"]},
            "a.y": {"id": "a.y", "label": "AY", "definition": "ay", "broader": ["a"]},
            "b": {"id": "b", "label": "B", "definition": "b", "expect": "refuse"},
            "b.z": {"id": "b.z", "label": "BZ", "definition": "bz", "broader": ["b", "a"]},
        }})


def test_primary_path_follows_first_listed_parents():
    tax = _tax()
    assert primary_path(tax, "b.z") == ["b", "b.z"]  # filed under its first parent only
    assert primary_path(tax, "a.x") == ["a", "a.x"]
    assert primary_path(tax, "nope") == []
    assert nearest_analysed(tax, "a.y", {"a", "a.x"}) == "a"
    assert nearest_analysed(tax, "a", {"a.x"}) is None
    assert counts_by_node([["a", "a.x"], ["a", "a.y"], ["a"]]) == {"a": 3, "a.x": 1, "a.y": 1}
    assert level_labels([["a", "a.x"], ["a"], []], 1, {"a.x"}) == ["a.x", "", ""]


def _planted(d: int = 48, n: int = 24, n_h: int = 60, seed: int = 0):
    """Three orthogonal planted directions: a.x, a.y (children of a) and b; a's prompts are a.x's and a.y's."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, 3, generator=gen))[0].T * 4.0
    truth = {"a.x": basis[0], "a.y": basis[1], "b": basis[2]}
    rows, paths = [], []
    for node, path in (("a.x", ["a", "a.x"]), ("a.y", ["a", "a.y"]), ("b", ["b"])):
        rows.append(truth[node] + torch.randn(n, d, generator=gen))
        paths += [path] * n
    rows.append(torch.randn(n_h, d, generator=gen))
    paths += [[]] * n_h
    x = torch.cat(rows)[:, None, None, :]
    harmful = [bool(p) for p in paths]
    return Activations(x, [0], [-1]), paths, harmful, truth


def test_every_depth_gets_directions_and_floors_that_recover_the_planted_truth(tmp_path):
    acts, paths, harmful, truth = _planted()
    ds = tree_direction_set(acts, paths, harmful, ["a", "b", "a.x", "a.y"], n_splits=20, n_boot=50, n_perm=20,
                            parents={"a.x": ["a"], "a.y": ["a"], "a": [], "b": []})
    assert ds.nodes == ["a", "b", "a.x", "a.y"] and ds.methods == ["diff_means"]
    assert ds.meta["depth"] == {"a": 0, "b": 0, "a.x": 1, "a.y": 1}
    assert ds.meta["n_prompts"]["a"] == 48 and ds.meta["n_prompts"]["a.x"] == 24
    for node, vec in truth.items():
        assert float(ds.unit(node, 0, -1) @ (vec / vec.norm())) > 0.9, node
        assert ds.reliability(node, 0, -1) > 0.8
    # a is the mean of its children: its direction sits between theirs
    mid = (truth["a.x"] + truth["a.y"]) / 2
    assert float(ds.unit("a", 0, -1) @ (mid / mid.norm())) > 0.9
    cos = ds.noise["diff_means/cos"]
    ia, ib, ix, iy = (ds.node_index(n) for n in ("a", "b", "a.x", "a.y"))
    assert math.isnan(float(cos[ia, ix, 0, 0]))  # nested nodes share prompts: no cross-depth cosine
    assert abs(float(cos[ix, iy, 0, 0])) < 0.4 and abs(float(cos[ia, ib, 0, 0])) < 0.4  # planted orthogonal
    # the merged set survives a save/load round trip and keeps one pooled direction
    ds.save(tmp_path / "tree")
    back = DirectionSet.load(tmp_path / "tree")
    assert back.nodes == ds.nodes and back.meta["depth"]["a.y"] == 1
    assert f"diff_means/{POOLED}/-1" in back.tensors
    assert torch.allclose(back.noise["diff_means/reliability"].nan_to_num(-9),
                          ds.noise["diff_means/reliability"].nan_to_num(-9))


def test_members_restrict_a_parent_to_its_own_sample():
    """With `members`, a parent is the prompts sampled for it, not every prompt of its deepest child."""
    acts, paths, harmful, truth = _planted(seed=2)
    ax = [i for i, p in enumerate(paths) if p[-1:] == ["a.x"]]
    ay = [i for i, p in enumerate(paths) if p[-1:] == ["a.y"]]
    # the parent sampled half of each child; a.x has all of its own prompts
    ds = tree_direction_set(acts, paths, harmful, ["a", "a.x"], members={"a": ax[::2] + ay[::2], "a.x": ax},
                            n_splits=10, n_boot=20, n_perm=10)
    assert ds.meta["n_prompts"]["a"] == len(ax[::2]) + len(ay[::2]) and ds.meta["n_prompts"]["a.x"] == len(ax)
    mid = (truth["a.x"] + truth["a.y"]) / 2
    assert float(ds.unit("a", 0, -1) @ (mid / mid.norm())) > 0.85
    only_x = tree_direction_set(acts, paths, harmful, ["a", "a.x"], members={"a": ax, "a.x": ax},
                                n_splits=10, n_boot=20, n_perm=10)
    assert torch.allclose(only_x.unit("a", 0, -1), only_x.unit("a.x", 0, -1), atol=1e-5)  # the bias avoided


def test_a_node_below_an_unanalysed_parent_still_gets_its_direction():
    acts, paths, harmful, truth = _planted(seed=1)
    ds = tree_direction_set(acts, paths, harmful, ["a.x", "b"], n_splits=10, n_boot=20, n_perm=10)
    assert ds.nodes == ["b", "a.x"]
    assert float(ds.unit("a.x", 0, -1) @ (truth["a.x"] / truth["a.x"].norm())) > 0.9
