"""The overlap graph: edges above the noise null, taxonomy edges, sibling test, files."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import torch

from refusal_atlas.lm.capture import Activations
from refusal_atlas.mechinterp.directions import DirectionSet
from refusal_atlas.mechinterp.extract import extract_directions
from refusal_atlas.mechinterp.overlap import choose_layer, overlap_graph, sibling_test, write_overlap


def family_acts(seed=0, n=30, d=48):
    """Siblings c1/c2 share a direction (parent 'cyber'); w1/w2 share another (parent 'weapons')."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.eye(d)
    planted = {"c1": e[0] + 0.3 * e[1], "c2": e[0] + 0.3 * e[2], "w1": e[3] + 0.3 * e[4], "w2": e[3] + 0.3 * e[5]}
    x, nodes, harmful = [], [], []
    for node, v in [*planted.items(), ("", torch.zeros(d))]:
        a = torch.randn(n, 3, 1, d, generator=gen)
        a[:, 1:] += 3 * v
        x.append(a)
        nodes += [node] * n
        harmful += [bool(node)] * n
    return Activations(torch.cat(x), [0, 1, 2], [-1]), nodes, harmful


PARENTS = {"c1": ["cyber"], "c2": ["cyber"], "w1": ["weapons"], "w2": ["weapons"], "cyber": [], "weapons": []}


def test_graph_edges_and_sibling_test(tmp_path):
    acts, nodes, harmful = family_acts()
    ds = extract_directions(acts, nodes, harmful, parents=PARENTS, labels={"c1": "Cyber one"},
                            n_model_layers=10, n_boot=100, n_perm=100)
    assert choose_layer(ds, -1) in (1, 2)
    g = overlap_graph(ds, layer=1)
    assert set(g.nodes) == {"c1", "c2", "w1", "w2"}
    assert g.nodes["c1"]["label"] == "Cyber one" and g.nodes["c1"]["best_layer"] in (1, 2)
    assert 0 < g.nodes["c1"]["reliability"] <= 1 and g.nodes["c1"]["n_prompts"] == 30
    overlap = {frozenset((a, b)) for a, b, d in g.edges(data=True) if d["kind"] == "overlap"}
    assert overlap == {frozenset(("c1", "c2")), frozenset(("w1", "w2"))}
    # the parents have no prompts, so no taxonomy edge can be drawn between graph nodes here
    assert not [1 for *_, d in g.edges(data=True) if d["kind"] == "taxonomy"]
    report = write_overlap(ds, tmp_path, layer=1)
    st = report["sibling_test"]
    assert st["n_sibling_pairs"] == 2 and st["n_other_pairs"] == 4
    assert st["mean_sibling_cos"] > 0.7 > st["mean_other_cos"]
    for name in ("overlap.graphml", "overlap.json", "heatmap.png", "graph.png"):
        assert (tmp_path / name).stat().st_size > 0
    back = nx.read_graphml(tmp_path / "overlap.graphml")
    assert back.number_of_nodes() == 4 and back.graph["layer"] == 1
    data = json.loads((tmp_path / "overlap.json").read_text())
    assert len(data["pairs"]) == 6 and all("floor_a" in p and "null95" in p for p in data["pairs"])
    # reload from disk gives the same graph
    ds.save(tmp_path / "dirs")
    again = overlap_graph(DirectionSet.load(tmp_path / "dirs"), layer=1)
    assert {frozenset((a, b)) for a, b, d in again.edges(data=True) if d["kind"] == "overlap"} == overlap


def test_taxonomy_edges_when_parents_have_directions():
    acts, nodes, harmful = family_acts()
    parents = {"c1": [], "c2": ["c1"], "w1": [], "w2": ["w1"]}
    ds = extract_directions(acts, nodes, harmful, parents=parents, n_boot=50, n_perm=50, profiles=False)
    g = overlap_graph(ds, layer=1)
    tax = {(a, b) for a, b, d in g.edges(data=True) if d["kind"] == "taxonomy"}
    assert {frozenset(e) for e in tax} == {frozenset(("c1", "c2")), frozenset(("w1", "w2"))}


def test_sibling_permutation_test_extremes():
    nodes = ["a", "b", "c", "d"]
    parents = {"a": ["x"], "b": ["x"], "c": ["y"], "d": ["y"]}
    cos = np.eye(4)
    cos[0, 1] = cos[1, 0] = cos[2, 3] = cos[3, 2] = 0.9
    res = sibling_test(cos, nodes, parents, n_perm=2000)
    assert res["statistic"] > 0.8 and res["p_value"] < 0.5
    flat = sibling_test(np.ones((4, 4)), nodes, parents, n_perm=500)
    assert flat["statistic"] == 0 and flat["p_value"] == 1.0
    none = sibling_test(cos, nodes, {}, n_perm=10)
    assert none["p_value"] is None
