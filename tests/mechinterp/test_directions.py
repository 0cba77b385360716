"""Per-node directions: the three methods, the pooled direction, the file format and lookups."""

from __future__ import annotations

import json

import pytest
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import Activations
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet, compute_directions


def toy(seed: int = 0, d: int = 16):
    gen = torch.Generator().manual_seed(seed)
    sizes = {"a": 5, "b": 7, "c": 4, "": 9}  # "" = harmless
    nodes, harmful, xs = [], [], []
    for node, n in sizes.items():
        xs.append(torch.randn(n, 2, 3, d, generator=gen) + (3.0 if node else 0.0) * (len(node) and ord(node) - 96))
        nodes += [node] * n
        harmful += [bool(node)] * n
    # two harmful prompts without a node: they count in the pooled direction only
    xs.append(torch.randn(2, 2, 3, d, generator=gen))
    nodes += ["", ""]
    harmful += [True, True]
    return Activations(torch.cat(xs), [3, 7], [-2, -1, "last_instruction"]), nodes, harmful


def test_methods_match_their_definitions():
    acts, nodes, harmful = toy()
    ds = compute_directions(acts, nodes, harmful)
    x = acts.acts
    idx = {n: [i for i, m in enumerate(nodes) if m == n and harmful[i]] for n in "abc"}
    harmless = x[[i for i, h in enumerate(harmful) if not h]].mean(0)
    means = {n: x[i].mean(0) for n, i in idx.items()}
    pooled = x[[i for i, h in enumerate(harmful) if h]].mean(0) - harmless
    for j, layer in enumerate(acts.layers):
        for k, pos in enumerate(acts.positions):
            assert torch.allclose(ds.get(POOLED, layer, pos), pooled[j, k], atol=1e-5)
            u = pooled[j, k] / pooled[j, k].norm()
            for n in "abc":
                diff = means[n][j, k] - harmless[j, k]
                assert torch.allclose(ds.get(n, layer, pos), diff, atol=1e-5)
                others = torch.stack([means[m][j, k] for m in "abc" if m != n]).mean(0)
                assert torch.allclose(ds.get(n, layer, pos, "vs_other"), means[n][j, k] - others, atol=1e-5)
                res = ds.get(n, layer, pos, "residual")
                assert torch.allclose(res, diff - (diff @ u) * u, atol=1e-4)
                assert abs(float(res @ u)) < 1e-3
                assert torch.isclose(ds.unit(n, layer, pos).norm(), torch.tensor(1.0))
    assert ds.nodes == ["a", "b", "c"]
    assert ds.meta["n_prompts"] == {"harmless": 9, "a": 5, "b": 7, "c": 4, "unassigned_harmful": 2}
    assert torch.equal(ds.harmfulness("a", 3), ds.get("a", 3, "last_instruction"))
    assert torch.equal(ds.refusal("a", 7), ds.get("a", 7, -1))


def test_save_load_roundtrip_and_file_format(tmp_path):
    acts, nodes, harmful = toy()
    ds = compute_directions(acts, nodes, harmful, meta={"model_id": "toy", "model_revision": "abc"})
    ds.save(tmp_path)
    meta = json.loads((tmp_path / "directions.json").read_text())
    assert meta["layers"] == [3, 7] and meta["positions"] == ["-2", "-1", "last_instruction"]
    assert meta["model_id"] == "toy" and meta["model_revision"] == "abc"
    assert meta["n_prompts"]["b"] == 7 and meta["methods"] == ["diff_means", "vs_other", "residual"]
    assert len(meta["norm"]["diff_means"]["a"]["-1"]) == 2
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "directions.safetensors"))
    assert raw["diff_means/b/-1"].shape == (2, 16)
    assert "diff_means/@pooled/last_instruction" in raw and "residual/@pooled/-1" not in raw
    back = DirectionSet.load(tmp_path)
    assert back.nodes == ds.nodes and back.positions == ds.positions and back.layers == ds.layers
    for key, t in ds.tensors.items():
        assert torch.equal(back.tensors[key], t)
    assert back.meta["roles"] == {"harmfulness": "last_instruction", "refusal": -1}


def test_lookup_and_input_errors(tmp_path):
    acts, nodes, harmful = toy()
    ds = compute_directions(acts, nodes, harmful)
    with pytest.raises(AtlasError, match="node 'zzz'"):
        ds.get("zzz", 3, -1)
    with pytest.raises(AtlasError, match="layer 5"):
        ds.get("a", 5, -1)
    with pytest.raises(AtlasError, match="position"):
        ds.get("a", 3, -3)
    with pytest.raises(AtlasError, match="fewer than 2"):
        compute_directions(acts, ["a", *nodes[1:5], "lonely", *nodes[6:]], harmful)
    with pytest.raises(AtlasError, match="unknown methods"):
        compute_directions(acts, nodes, harmful, methods=["pca"])
    with pytest.raises(AtlasError, match="run `refusal-atlas directions extract`"):
        DirectionSet.load(tmp_path / "nothing")


def form_confounded(seed: int = 0, d: int = 32):
    """Harmful prompts of two nodes and harmless ones that differ in request form as well as in harm.

    Planted: a harm direction h (harmful prompts only) and a form direction f (questions only). Node
    "a" is mostly instructions, node "b" mostly questions, the harmless set mostly questions.
    """
    gen = torch.Generator().manual_seed(seed)
    h = torch.zeros(d)
    h[0] = 4.0
    f = torch.zeros(d)
    f[1] = 6.0
    plan = [("a", True, "instruction", 14), ("a", True, "question", 2), ("b", True, "question", 12),
            ("b", True, "instruction", 4), ("", False, "question", 30), ("", False, "instruction", 10)]
    nodes, harmful, forms, xs = [], [], [], []
    for node, harm, form, n in plan:
        xs.append(0.3 * torch.randn(n, 1, 1, d, generator=gen) + h * harm + f * (form == "question"))
        nodes += [node] * n
        harmful += [harm] * n
        forms += [form] * n
    return Activations(torch.cat(xs), [0], [-1]), nodes, harmful, forms, h, f


def test_matched_baseline_removes_a_planted_form_confound():
    acts, nodes, harmful, forms, h, f = form_confounded()
    plain = compute_directions(acts, nodes, harmful)
    matched = compute_directions(acts, nodes, harmful, strata=forms)
    cos = torch.nn.functional.cosine_similarity
    for node in ("a", "b", POOLED):
        # unmatched: node "a" (instructions against question-heavy harmless prompts) points partly along -f
        assert abs(float(cos(matched.get(node, 0, -1), h, dim=0))) > 0.98
        assert abs(float(matched.get(node, 0, -1) @ f / f.norm())) < 0.3
    assert float(plain.get("a", 0, -1) @ f / f.norm()) < -3.0
    info = matched.meta["harmless_matched_on"]
    assert info["strata"] == ["instruction", "question"]
    assert info["harmless_per_stratum"] == {"instruction": 10, "question": 30}
    assert info["shares"]["a"] == {"instruction": 0.875, "question": 0.125}
    assert info["shares"][POOLED] == {"instruction": 0.5625, "question": 0.4375}
    # the matched baseline is the stratum means weighted by the node's shares
    x = acts.acts[:, 0, 0]
    base = {s: x[[i for i, (hh, fm) in enumerate(zip(harmful, forms, strict=True)) if not hh and fm == s]].mean(0)
            for s in ("instruction", "question")}
    a = x[[i for i, n in enumerate(nodes) if n == "a"]].mean(0)
    assert torch.allclose(matched.get("a", 0, -1), a - 0.875 * base["instruction"] - 0.125 * base["question"],
                          atol=1e-5)


def test_matching_falls_back_where_it_cannot_match():
    acts, nodes, harmful, forms, _, _ = form_confounded()
    plain = compute_directions(acts, nodes, harmful)
    # one stratum, or a stratum with a single harmless prompt: nothing to match on, same as unmatched
    same = compute_directions(acts, nodes, harmful, strata=["x"] * len(nodes))
    lonely = ["rare" if (not h and i == len(nodes) - 1) else "common" for i, h in enumerate(harmful)]
    for other in (same, compute_directions(acts, nodes, harmful, strata=lonely)):
        assert "harmless_matched_on" not in other.meta
        for node in ("a", "b", POOLED):
            assert torch.allclose(other.get(node, 0, -1), plain.get(node, 0, -1))
    with pytest.raises(AtlasError, match="strata"):
        compute_directions(acts, nodes, harmful, strata=forms[:-1])
