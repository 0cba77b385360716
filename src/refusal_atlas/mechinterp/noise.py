"""Noise floors for every direction: how much of a cosine is signal, given 10–50 prompts per node.

For each node, layer and position (all computed in one vectorised pass per layer, seeded):
- **split-half cosine**: split the node's prompts *and* the harmless set into random halves
  (`n_splits` times) and take the cosine between the two half-sample directions — the floor a
  cross-node cosine must be read against. We keep its mean and 5th percentile.
- **reliability** = Spearman–Brown step-up of the mean split-half cosine, `2c / (1 + c)`: the
  expected cosine between two independent *full-sample* estimates. (With signal power s and
  full-sample noise power e, half-sample cosines are ≈ s / (s + 2e) and full-sample ones
  ≈ s / (s + e), which is exactly that step-up.)
- **bootstrap CIs** (prompts resampled with replacement within every group, `n_boot` times) for
  each direction's norm and for every cross-node cosine.
- **chance null** for cross-node cosines (`diff_means`): the cosine of node a's direction with
  `n_perm` fake directions of node b's sample size drawn from the harmless prompts alone;
  `cos_null95` is the 95th percentile (the larger of a|b and b|a): the alignment that noise with
  the activations' own anisotropy produces by chance. (Reported beside each cosine; the overlap
  graph's edge rule uses the noise-corrected cosine below.)
- **noise-corrected cosine** (`cos_debiased`): sampling noise adds `sum_g c_ag c_bg tr(Σ_g)/n_g` to
  the inner product of two directions built from group means with weights c (for two
  `diff_means` directions that is the harmless mean's variance, shared by both — it inflates raw
  cross-node cosines), and the same with a = b to squared norms. Subtracting the within-group
  estimates gives an estimate of the cosine between the *true* directions; 1 means "the same
  direction", and a bootstrap upper bound below 1 means the nodes are distinguishable.
All bootstrap intervals are basic (pivotal) 95 % intervals, see `_basic_ci`.

Arrays are stored as `{method}/{stat}` with the node axis in `DirectionSet.nodes_with_pooled` order:
`split_half_mean`, `split_half_p05`, `reliability` [K+1, L, P]; `norm_ci` [K+1, L, P, 2];
`cos`, `cos_debiased` [K+1, K+1, L, P]; `cos_ci`, `cos_debiased_ci` [K+1, K+1, L, P, 2];
`diff_means/cos_null95` [K+1, K+1, L, P].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import Activations
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.mechinterp.directions import METHODS, DirectionSet, Groups, directions_from_means, group_means


def split_half_weights(groups: Groups, n_splits: int, gen: torch.Generator) -> list[Tensor]:
    """Per group [2 * n_splits, n_g] weights: rows 2s and 2s+1 are the two halves of split s."""
    out = []
    for idx in groups.all_groups():
        n = len(idx)
        w = torch.zeros((2 * n_splits, max(n, 0)))
        if n == 0:
            out.append(w)
            continue
        half = n // 2
        for s in range(n_splits):
            perm = torch.randperm(n, generator=gen)
            a, b = perm[:half], perm[half:]
            if half == 0:  # a single prompt cannot be split: both halves use it
                a = b
            w[2 * s, a] = 1.0 / len(a)
            w[2 * s + 1, b] = 1.0 / len(b)
        out.append(w)
    return out


def bootstrap_weights(groups: Groups, n_boot: int, gen: torch.Generator) -> list[Tensor]:
    """Per group [n_boot, n_g] resampling weights (counts / n_g), prompts drawn with replacement."""
    out = []
    for idx in groups.all_groups():
        n = len(idx)
        if n == 0:
            out.append(torch.zeros((n_boot, 0)))
            continue
        draws = torch.randint(0, n, (n_boot, n), generator=gen)
        counts = torch.zeros((n_boot, n)).scatter_add_(1, draws, torch.ones((n_boot, n)))
        out.append(counts / n)
    return out


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def spearman_brown(split_half: Tensor) -> Tensor:
    c = split_half.clamp(min=0.0, max=1.0)
    return 2 * c / (1 + c)


def _coefficients(groups: Groups, method: str) -> Tensor:
    """[K+1, G] weights of each direction on the group means (groups as in `Groups.all_groups`)."""
    k = len(groups.nodes)
    s = len(groups.harmless_groups)
    c = torch.zeros((k + 1, s + k + 1))
    sizes = torch.tensor([len(v) for v in groups.nodes.values()] + [len(groups.unassigned)], dtype=torch.float32)
    if method == "vs_other":
        if k > 1:
            c[:k, s : s + k] = -1.0 / (k - 1)
            c[:k, s : s + k].fill_diagonal_(1.0)
        return c
    # diff_means, and residual (a projection of diff_means; the one-dimensional difference is ignored)
    baseline = groups.baseline_weights()
    c[:, :s] = -baseline
    c[:k, s : s + k] = torch.eye(k)
    c[k, s:] = sizes / sizes.sum()
    return c


def _noise_power(sq_means: Tensor, mean_gram: Tensor, groups: Groups) -> Tensor:
    """[R, G, P]: trace of each group mean's sampling covariance, tr(Σ_g) / n_g, per replicate.

    `sq_means` [R, G, P] are the (weighted) group means of squared norms, `mean_gram` [R, G, G, P]
    the Gram matrix of the group means [R, P, G, G].
    """
    sizes = torch.tensor([max(len(i) - 1, 1) for i in groups.all_groups()], dtype=sq_means.dtype)
    own = mean_gram.diagonal(dim1=-2, dim2=-1).transpose(1, 2)  # [R, G, P]
    return (sq_means - own).clamp_min(0) / sizes.reshape(1, -1, 1)


def _mean_gram(left: Tensor, right: Tensor) -> Tensor:
    """Group-mean Gram matrices [R, P, G, G] from means [R, G, P, d] (batched matmul)."""
    return left.permute(0, 2, 1, 3) @ right.permute(0, 2, 3, 1)


def _direction_gram(coef: Tensor, cross: Tensor, left: Tensor, right: Tensor, residual: bool) -> Tensor:
    """Inner products [R, P, K1, K1] of directions built from two sets of group means.

    `cross`, `left`, `right` are group-mean Gram matrices [R, P, G, G] (left·right, left·left,
    right·right). Directions are `coef @ means`; for `residual`, each direction loses its
    projection on its own side's pooled direction (the last row of the diff_means coefficients).
    Working with [G, G] Gram matrices instead of d-dimensional vectors keeps hundreds of
    bootstrap replicates cheap.
    """
    ab = coef @ cross @ coef.T
    if not residual:
        return ab
    aa = coef @ left @ coef.T
    bb = coef @ right @ coef.T
    pa = aa[..., -1:, -1:].clamp_min(1e-24).sqrt()  # |pooled_left|  [R, P, 1, 1]
    pb = bb[..., -1:, -1:].clamp_min(1e-24).sqrt()
    da_ua = aa[..., :, -1:] / pa  # d_a · u_left    [R, P, K1, 1]
    db_ub = bb[..., -1:, :] / pb  # d_b · u_right   [R, P, 1, K1]
    da_ub = ab[..., :, -1:] / pb  # d_a · u_right
    ua_db = ab[..., -1:, :] / pa  # u_left · d_b
    ua_ub = ab[..., -1:, -1:] / (pa * pb)
    return ab - db_ub * da_ub - da_ua * ua_db + da_ua * db_ub * ua_ub


def _cosines(gram: Tensor, power_bias: Tensor | None = None) -> Tensor:
    """Cosine matrices [R, K, K, P] from a Gram matrix [R, P, K, K]; with `power_bias`, the noise-corrected one.

    E[d_a . d_b] = v_a . v_b + sum_g c_ag c_bg tr(Σ_g)/n_g, so subtracting that sum removes the
    bias noise (and the shared harmless mean) puts in cosines. A direction whose corrected
    squared norm is not positive is not detectable: its cosines are NaN.
    """
    g = gram if power_bias is None else gram - power_bias
    diag = g.diagonal(dim1=-2, dim2=-1)  # [R, P, K]
    scale = diag.clamp_min(1e-24).sqrt()
    cos = g / (scale.unsqueeze(-1) * scale.unsqueeze(-2))
    if power_bias is not None:
        cos = torch.where((diag.unsqueeze(-1) > 0) & (diag.unsqueeze(-2) > 0), cos, float("nan"))
    return cos.permute(0, 2, 3, 1)  # [R, K, K, P]


def _basic_ci(point: Tensor, replicates: Tensor, center: Tensor | None = None) -> Tensor:
    """Basic (pivotal) bootstrap 95 % interval, [..., 2]: point − (q97.5 − center), point − (q2.5 − center).

    Resampling adds noise on top of the sample's own, which pulls bootstrap cosines toward zero
    (and pushes norms up); the pivotal interval corrects that first-order bias, which the plain
    percentile interval does not (it can miss the point estimate altogether). `center` is the
    bootstrap world's true value: the plug-in statistic (for the noise-corrected cosine that is
    the raw cosine of the sample means, which the corrected estimator targets in that world).
    """
    center = point if center is None else center
    q = torch.nanquantile(replicates, torch.tensor([0.025, 0.975]), dim=0)
    return torch.stack([point - (q[1] - center), point - (q[0] - center)], dim=-1)


@torch.inference_mode()
def noise_floor(
    acts: Activations,
    groups: Groups,
    *,
    methods: tuple[str, ...] = METHODS,
    n_splits: int = 50,
    n_boot: int = 200,
    n_perm: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """All noise statistics for an `Activations` (see the module docstring for the keys)."""
    gen = torch.Generator().manual_seed(seed)
    w_split = split_half_weights(groups, n_splits, gen)
    w_boot = bootstrap_weights(groups, n_boot, gen)
    k1 = len(groups.nodes) + 1
    n_layers, n_pos = acts.acts.shape[1], acts.acts.shape[2]
    stats: dict[str, Tensor] = {}

    def put(key: str, layer: int, value: Tensor, shape: tuple[int, ...], layer_axis: int) -> None:
        if key not in stats:
            stats[key] = torch.full(shape, float("nan"))
        index: list[slice | int] = [slice(None)] * len(shape)
        index[layer_axis] = layer
        stats[key][tuple(index)] = value

    shp, pl, pm = (k1, n_layers, n_pos), (k1, k1, n_layers, n_pos), (k1, k1, n_layers, n_pos, 2)
    w_split = [w.double() for w in w_split]
    w_boot = [w.double() for w in w_boot]
    coefs = {m: _coefficients(groups, "vs_other" if m == "vs_other" else "diff_means").double() for m in methods}
    for layer in tqdm(range(n_layers), desc="noise floor", unit="layer", disable=not progress):
        x = acts.acts[:, layer].double()  # [n, P, d]; float64 keeps the bias subtraction exact
        sq = (x * x).sum(-1)  # [n, P]
        real_m = group_means(x, groups)  # [1, G, P, d]
        real_gm = _mean_gram(real_m, real_m)
        real_power = _noise_power(group_means(sq, groups), real_gm, groups)
        split_m = group_means(x, groups, w_split)
        ma, mb = split_m[0::2], split_m[1::2]
        g_ab, g_aa, g_bb = _mean_gram(ma, mb), _mean_gram(ma, ma), _mean_gram(mb, mb)
        boot_m = group_means(x, groups, w_boot)
        boot_gm = _mean_gram(boot_m, boot_m)
        boot_power = _noise_power(group_means(sq, groups, w_boot), boot_gm, groups)
        for method in methods:
            rows = k1 if method == "diff_means" else k1 - 1  # the pooled row exists for diff_means only
            coef, res = coefs[method], method == "residual"
            # split-half: cosine between the two halves' directions, node by node
            ab = _direction_gram(coef, g_ab, g_aa, g_bb, res).diagonal(dim1=-2, dim2=-1)  # [S, P, K1]
            aa = _direction_gram(coef, g_aa, g_aa, g_aa, res).diagonal(dim1=-2, dim2=-1)
            bb = _direction_gram(coef, g_bb, g_bb, g_bb, res).diagonal(dim1=-2, dim2=-1)
            sh = (ab / (aa * bb).clamp_min(1e-24).sqrt()).transpose(1, 2)[:, :rows].float()  # [S, rows, P]
            put(f"{method}/split_half_mean", layer, _pad_rows(sh.mean(0), k1), shp, 1)
            put(f"{method}/split_half_p05", layer, _pad_rows(torch.quantile(sh, 0.05, dim=0), k1), shp, 1)
            put(f"{method}/reliability", layer, _pad_rows(spearman_brown(sh.mean(0)), k1), shp, 1)
            # bootstrap: norms and cosines, raw and noise-corrected
            c = coef[:rows]
            bias_real = (c * real_power.transpose(1, 2).unsqueeze(-2)) @ c.T  # [1, P, rows, rows]
            bias_boot = (c * boot_power.transpose(1, 2).unsqueeze(-2)) @ c.T
            gram = _direction_gram(coef, real_gm, real_gm, real_gm, res)[..., :rows, :rows]
            gram_b = _direction_gram(coef, boot_gm, boot_gm, boot_gm, res)[..., :rows, :rows]
            norm = gram[0].diagonal(dim1=-2, dim2=-1).T.clamp_min(0).sqrt().float()  # [rows, P]
            norms_b = gram_b.diagonal(dim1=-2, dim2=-1).transpose(1, 2).clamp_min(0).sqrt().float()
            put(f"{method}/norm_ci", layer, _pad_rows(_basic_ci(norm, norms_b), k1), (k1, n_layers, n_pos, 2), 1)
            raw, raw_b = _cosines(gram)[0].float(), _cosines(gram_b).float()
            deb, deb_b = _cosines(gram, bias_real)[0].float(), _cosines(gram_b, bias_boot).float()
            put(f"{method}/cos", layer, _pad_square(raw, k1), pl, 2)
            put(f"{method}/cos_ci", layer, _pad_square(_basic_ci(raw, raw_b), k1), pm, 2)
            put(f"{method}/cos_debiased", layer, _pad_square(deb, k1), pl, 2)
            put(f"{method}/cos_debiased_ci", layer, _pad_square(_basic_ci(deb, deb_b, center=raw), k1), pm, 2)
        if "diff_means" in methods and n_perm > 0:
            units = _unit(directions_from_means(real_m, groups)["diff_means"][0].float())
            null = _permutation_null(x.float(), groups, units, n_perm, gen)
            put("diff_means/cos_null95", layer, null, pl, 2)
    return stats


def _pad_rows(t: Tensor, k1: int) -> Tensor:
    if t.shape[0] == k1:
        return t
    return torch.cat([t, torch.full((k1 - t.shape[0], *t.shape[1:]), float("nan"))])


def _pad_square(t: Tensor, k1: int) -> Tensor:
    if t.shape[0] == k1:
        return t
    out = torch.full((k1, k1, *t.shape[2:]), float("nan"))
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _permutation_null(x: Tensor, groups: Groups, units: Tensor, n_perm: int, gen: torch.Generator) -> Tensor:
    """[K+1, K+1, P] 95th percentile of cos(dir_a, a fake dir_b) built from harmless prompts alone.

    The fake direction is the mean of n_b randomly chosen harmless prompts minus the mean of the
    rest (drawn with replacement when the harmless set is too small): a direction with b's sample
    size and the data's own noise structure (anisotropy included) but no signal. Shuffling b's own
    prompts into the harmless set instead would leak b's direction into the null and, for strong
    directions, make the null as large as the cosine it is meant to judge.
    """
    k1 = units.shape[0]
    flat = x.reshape(x.shape[0], -1)
    harmless = flat[groups.harmless]
    n_h = len(groups.harmless)
    null = torch.full((k1, k1, x.shape[1]), float("nan"))
    for j, idx in enumerate(groups.nodes.values()):
        n_b = len(idx)
        if n_h >= n_b + 2:
            w = torch.full((n_perm, n_h), -1.0 / (n_h - n_b))
            for r in range(n_perm):
                w[r, torch.randperm(n_h, generator=gen)[:n_b]] = 1.0 / n_b
            fake = w @ harmless
        else:
            a = torch.randint(0, n_h, (n_perm, n_b), generator=gen)
            b = torch.randint(0, n_h, (n_perm, n_h), generator=gen)
            fake = harmless[a].mean(1) - harmless[b].mean(1)
        fake = _unit(fake.reshape(n_perm, *x.shape[1:]))  # [R, P, d]
        cos = torch.einsum("kpd,rpd->rkp", units, fake)  # [R, K+1, P]
        null[:, j] = torch.quantile(cos, 0.95, dim=0)
    # Symmetrise conservatively (the pooled column has no null: it is not a node).
    both = torch.stack([null, null.transpose(0, 1)])
    return torch.where(both.isnan().all(0), float("nan"), torch.nan_to_num(both, nan=-1.0).amax(0))


@dataclass
class PairRow:
    """One cross-node cosine beside both nodes' floors (a row of `cosine_report`)."""

    a: str
    b: str
    cos: float
    ci_low: float
    ci_high: float
    cos_debiased: float
    debiased_ci_low: float
    debiased_ci_high: float
    floor_a: float
    floor_b: float
    reliability_a: float
    reliability_b: float
    null95: float | None

    @property
    def above_null(self) -> bool:
        """The cosine's bootstrap lower bound exceeds the permutation null's 95th percentile."""
        return self.null95 is not None and self.ci_low > self.null95

    @property
    def overlaps(self) -> bool:
        """The noise-corrected cosine's bootstrap lower bound is above 0: the true directions overlap."""
        return not math.isnan(self.debiased_ci_low) and self.debiased_ci_low > 0.0

    @property
    def distinct(self) -> bool:
        """The noise-corrected cosine's upper bound is below 1: not one direction seen twice."""
        return not math.isnan(self.debiased_ci_high) and self.debiased_ci_high < 1.0


def cosine_report(ds: DirectionSet, layer: int, position: Position, method: str = "diff_means",
                  include_pooled: bool = False) -> list[PairRow]:
    """Every cross-node cosine at one layer/position, with CIs, both floors and the null."""
    if f"{method}/cos" not in ds.noise:
        raise AtlasError(f"no noise estimates for {method!r} at {position_label(position)}; "
                         "re-run `directions extract` (noise is computed there)")
    li, pi = ds.layer_index(layer), ds.position_index(position)
    names = ds.nodes_with_pooled if include_pooled and method == "diff_means" else ds.nodes
    n = ds.noise
    null = n.get("diff_means/cos_null95") if method == "diff_means" else None

    def val(key: str, *idx: int) -> float:
        return float(n[f"{method}/{key}"][idx])

    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ia, ib = ds.node_index(a), ds.node_index(b)
            nv = None if null is None else float(null[ia, ib, li, pi])
            rows.append(PairRow(
                a, b, val("cos", ia, ib, li, pi),
                val("cos_ci", ia, ib, li, pi, 0), val("cos_ci", ia, ib, li, pi, 1),
                val("cos_debiased", ia, ib, li, pi),
                val("cos_debiased_ci", ia, ib, li, pi, 0), val("cos_debiased_ci", ia, ib, li, pi, 1),
                val("split_half_mean", ia, li, pi), val("split_half_mean", ib, li, pi),
                val("reliability", ia, li, pi), val("reliability", ib, li, pi),
                None if nv is None or math.isnan(nv) else nv,
            ))
    return rows
