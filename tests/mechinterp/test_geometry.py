"""Geometry (cosines, spectrum, principal angles) and layer profiles (AUROC, node-identity probe)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refusal_atlas.lm.capture import Activations
from refusal_atlas.mechinterp.directions import Groups, compute_directions
from refusal_atlas.mechinterp.geometry import (
    cosine_matrices,
    cosine_matrix,
    geometry_table,
    principal_angle_matrix,
    principal_angles,
    spectrum,
)
from refusal_atlas.mechinterp.probes import auroc_from_scores, auroc_profile, probe_accuracy


def layered(seed=0, n=30, d=32):
    """Layer 0: nodes indistinguishable from harmless; layer 1: each node has its own direction."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.eye(d)
    x, nodes, harmful = [], [], []
    for k, node in enumerate(["p", "q", "r", ""]):
        a = torch.randn(n, 2, 1, d, generator=gen)
        if node:
            a[:, 1, 0] += 4 * basis[k]
        x.append(a)
        nodes += [node] * n
        harmful += [bool(node)] * n
    return Activations(torch.cat(x), [0, 1], [-1]), nodes, harmful


def test_cosines_and_spectrum():
    v = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 2]])
    c = cosine_matrix(v)
    assert torch.allclose(c.diagonal(), torch.ones(3)) and torch.isclose(c[0, 1], torch.tensor(2**-0.5))
    same = spectrum(torch.ones(4, 5))
    assert same["participation_ratio"] == pytest.approx(1.0) and same["first_component"] == pytest.approx(1.0)
    ortho = spectrum(torch.eye(4) * 3)
    assert ortho["participation_ratio"] == pytest.approx(4.0) and ortho["effective_rank"] == pytest.approx(4.0)
    acts, nodes, harmful = layered()
    ds = compute_directions(acts, nodes, harmful)
    mats = cosine_matrices(ds, -1)
    assert mats.shape == (2, 3, 3)
    rows = geometry_table(ds, -1)
    assert rows[1]["mean_cos"] < 0.3 and rows[1]["participation_ratio"] > 2.5


def test_principal_angles():
    a = np.eye(5)[:, :2]
    assert np.allclose(principal_angles(a, a), 0, atol=1e-6)
    assert np.allclose(principal_angles(a, np.eye(5)[:, 2:4]), 90)
    acts, nodes, harmful = layered()
    res = principal_angle_matrix(acts, Groups.from_labels(nodes, harmful), 1, -1, k=2)
    assert res["angles"].shape == (3, 3, 2)
    assert res["angles"][0, 1, 0] > 45  # orthogonal planted directions: large first angle


def test_auroc_and_probe_profiles():
    assert auroc_from_scores(np.array([3.0, 4]), np.array([1.0, 2])) == 1.0
    assert auroc_from_scores(np.array([1.0]), np.array([1.0])) == 0.5
    acts, nodes, harmful = layered()
    au = auroc_profile(acts, Groups.from_labels(nodes, harmful))
    assert set(au) == {"p", "q", "r"} and au["p"].shape == (2, 1)
    assert all(a[1, 0] > 0.95 for a in au.values())
    assert all(0.2 < a[0, 0] < 0.8 for a in au.values())
    probe = probe_accuracy(acts, nodes, harmful, folds=3)
    assert probe["classes"] == ["p", "q", "r"] and probe["chance"] == pytest.approx(1 / 3)
    assert probe["accuracy"][1, 0] > 0.9 and probe["accuracy"][0, 0] < 0.7
