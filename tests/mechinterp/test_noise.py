"""Noise floors: split-half cosines, reliability, bootstrap intervals and the permutation null."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import Activations
from refusal_atlas.mechinterp.directions import Groups, compute_directions
from refusal_atlas.mechinterp.noise import cosine_report, noise_floor, spearman_brown


def two_nodes(n_k=40, n_h=80, d=64, signal=3.0, seed=0, same=False):
    gen = torch.Generator().manual_seed(seed)
    v1 = torch.randn(d, generator=gen)
    v1 = signal * v1 / v1.norm()
    v2 = v1 if same else signal * torch.linalg.qr(torch.stack([v1, torch.randn(d, generator=gen)]).T)[0][:, 1]
    x = torch.cat([v1 + torch.randn(n_k, d, generator=gen), v2 + torch.randn(n_k, d, generator=gen),
                   torch.randn(n_h, d, generator=gen)])
    nodes = ["a"] * n_k + ["b"] * n_k + [""] * n_h
    harmful = [True] * (2 * n_k) + [False] * n_h
    return Activations(x[:, None, None, :], [0], [-1]), nodes, harmful


def test_split_half_matches_theory_and_reliability_steps_up():
    acts, nodes, harmful = two_nodes()
    stats = noise_floor(acts, Groups.from_labels(nodes, harmful), n_splits=100, n_boot=50, n_perm=20)
    expected = 9.0 / (9.0 + 2 * 64 * (1 / 40 + 1 / 80))
    sh = stats["diff_means/split_half_mean"][:2, 0, 0]
    assert torch.allclose(sh, torch.full_like(sh, expected), atol=0.05)
    assert (stats["diff_means/split_half_p05"][:2, 0, 0] < sh).all()
    assert torch.allclose(stats["diff_means/reliability"][:2, 0, 0], spearman_brown(sh))
    assert math.isclose(float(spearman_brown(torch.tensor(0.5))), 2 / 3, rel_tol=1e-6)
    for key, shape in {"diff_means/cos": (3, 3, 1, 1), "residual/cos_ci": (3, 3, 1, 1, 2),
                       "vs_other/norm_ci": (3, 1, 1, 2), "diff_means/cos_null95": (3, 3, 1, 1)}.items():
        assert tuple(stats[key].shape) == shape
    assert torch.isnan(stats["residual/split_half_mean"][2]).all()  # the pooled row is diff_means-only


def test_noise_is_seeded():
    acts, nodes, harmful = two_nodes()
    g = Groups.from_labels(nodes, harmful)
    a = noise_floor(acts, g, n_splits=10, n_boot=20, n_perm=10, seed=3)
    b = noise_floor(acts, g, n_splits=10, n_boot=20, n_perm=10, seed=3)
    assert all(torch.equal(a[k].nan_to_num(-9), b[k].nan_to_num(-9)) for k in a)


@pytest.mark.parametrize("same", [True, False])
def test_cross_node_cosines_beside_their_floors(same):
    acts, nodes, harmful = two_nodes(same=same, signal=4.0)
    ds = compute_directions(acts, nodes, harmful)
    ds.noise = noise_floor(acts, Groups.from_labels(nodes, harmful), n_splits=50, n_boot=200, n_perm=100)
    (row,) = cosine_report(ds, 0, -1)
    assert (row.a, row.b) == ("a", "b")
    assert 0 < row.floor_a < 1 and 0 < row.floor_b < 1 and row.ci_low < row.ci_high
    truth = 1.0 if same else 0.0
    assert row.debiased_ci_low - 0.05 <= truth <= row.debiased_ci_high + 0.05
    assert row.above_null is same  # same direction: far above chance; orthogonal: not
    assert row.overlaps is same
    assert row.distinct is not same
    rows = cosine_report(ds, 0, -1, include_pooled=True)
    assert [(r.a, r.b) for r in rows] == [("a", "b"), ("a", "@pooled"), ("b", "@pooled")]


def test_report_without_noise_is_a_clear_error():
    acts, nodes, harmful = two_nodes()
    with pytest.raises(AtlasError, match="no noise estimates"):
        cosine_report(compute_directions(acts, nodes, harmful), 0, -1)
