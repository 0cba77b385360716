"""Harmfulness vs refusal per node: the four cells, two directions at two positions, their cosine
against the noise floor, and projections of every prompt group onto both.

Cells (from a corpus's harm labels and detector labels): `HR` harmful × refused, `HC` harmful ×
complied, `LR` harmless × refused, `LC` harmless × complied. A node's harmful cells hold its own
harmful prompts; harmless prompts belong to no harm source, so every node shares the pooled harmless
cells (the pseudo-node `ALL` pools every harmful prompt too). A cell with fewer than `MIN_READ`
prompts is "too small to read": its mean is reported but no verdict rests on it.

Directions, following Zhao et al. 2025: harmfulness `h` at the last instruction token, refusal `r`
at the last template token. With all four cells readable they are the 2×2 main effects, so neither
absorbs the other through the correlation of harm with refusal:
    h = ½(HR + HC) − ½(LR + LC)   (harm, refusal held balanced)
    r = ½(HR − HC) + ½(LR − LC)   (refusal, harm held balanced)
Otherwise (a cell empty) the confounded contrasts harmful − harmless and refused − complied are
used and the design is recorded as `confounded`; no verdict is drawn from it.

Noise: split-half cosines of each direction (every cell halved, `noise.split_half_weights`) give its
floor and Spearman–Brown reliability; prompts resampled within cells give bootstrap (basic) CIs of
the cross cosine. Because each estimate is noisy, the cosine between two estimates of one and the
same direction is only about √(rel_h · rel_r); the *disattenuated* cosine divides by that, so 1
means "the same direction" whatever the sample sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import Activations
from refusal_atlas.lm.positions import LAST_INSTRUCTION, Position
from refusal_atlas.mechinterp.directions import Groups, group_means
from refusal_atlas.mechinterp.noise import _basic_ci, bootstrap_weights, spearman_brown, split_half_weights

CELLS = ("HR", "HC", "LR", "LC")
CELL_NAMES = {"HR": "harmful × refused", "HC": "harmful × complied", "LR": "harmless × refused",
              "LC": "harmless × complied"}
ALL = "@all"  # every harmful prompt, whatever its node ('@' never occurs in a taxonomy id)
MIN_READ = 5  # fewer prompts in a cell: "too small to read" (a mean of <5 prompts has a CI as wide as the effect)
MIN_CELL = 2  # fewer: the cell cannot be split in halves, so it is left out of the estimate altogether
RELIABLE = 0.5  # split-half reliability both directions need at a layer for its cosine to count
READ_BAND = (0.3, 0.8)  # shares of depth where the read layer is chosen (Arditi et al.'s layers: 0.38-0.63)
HARM_POSITION: Position = LAST_INSTRUCTION
REFUSAL_POSITION: Position = -1
FACTORIAL = {"h": (0.5, 0.5, -0.5, -0.5), "r": (0.5, -0.5, 0.5, -0.5)}


def cell_labels(harmful: Sequence[bool], refused: Sequence[bool]) -> list[str]:
    return [("H" if h else "L") + ("R" if r else "C") for h, r in zip(harmful, refused, strict=True)]


def cell_indices(nodes: Sequence[str], harmful: Sequence[bool],
                 refused: Sequence[bool]) -> dict[str, dict[str, list[int]]]:
    """{node: {cell: row indices}}: harmful cells per node (and `ALL`), harmless cells pooled for every node."""
    labels = cell_labels(harmful, refused)
    shared = {c: [i for i, lab in enumerate(labels) if lab == c] for c in ("LR", "LC")}
    names = sorted({str(n) for n, h in zip(nodes, harmful, strict=True) if h and n})
    out: dict[str, dict[str, list[int]]] = {}
    for node in [*names, ALL]:
        rows = [i for i, (n, h) in enumerate(zip(nodes, harmful, strict=True)) if h and (node == ALL or n == node)]
        out[node] = {"HR": [i for i in rows if labels[i] == "HR"], "HC": [i for i in rows if labels[i] == "HC"],
                     **shared}
    return out


def cell_table(table: pd.DataFrame, node_column: str = "analysis_node") -> pd.DataFrame:
    """n per cell and per node, with the node's own harmless cells (probes resembling it) beside the pooled
    ones the directions use, and which cells are too small to read (< MIN_READ)."""
    for col in (node_column, "harmful", "refused"):
        if col not in table.columns:
            raise AtlasError(f"cell table needs a {col!r} column (have: {', '.join(map(str, table.columns))})")
    harmful = table["harmful"].astype(bool).to_numpy()
    refused = table["refused"].astype(bool).to_numpy()
    nodes = table[node_column].fillna("").astype(str).to_numpy()
    cells = cell_indices(list(nodes), list(harmful), list(refused))
    resembles = table["resembles"].fillna("").astype(str).to_numpy() if "resembles" in table.columns else None
    rows = []
    for node, idx in cells.items():
        rec: dict[str, object] = {"node": node}
        for c in CELLS:
            rec[f"n_{c}"] = len(idx[c])
        if resembles is not None and node != ALL:
            own = (resembles == node) & ~harmful
            rec["n_LR_own"] = int((own & refused).sum())
            rec["n_LC_own"] = int((own & ~refused).sum())
        rec["n_node"] = len(idx["HR"]) + len(idx["HC"])
        small = [c for c in CELLS if len(idx[c]) < MIN_READ]
        rec["too_small"] = ",".join(small)
        rec["design"] = "factorial" if all(len(idx[c]) >= MIN_CELL for c in CELLS) else "confounded"
        rows.append(rec)
    out = pd.DataFrame(rows)
    for col in ("n_LR_own", "n_LC_own"):  # counts, empty for the pooled node (not 3.0 beside a NaN)
        if col in out.columns:
            out[col] = out[col].astype("Int64")
    return out


# --------------------------------------------------------------------------------------------
# Directions with floors and CIs
# --------------------------------------------------------------------------------------------


def _coefficients(idx: Mapping[str, Sequence[int]], which: str) -> Tensor:
    """Weights of a direction on the four cell means (CELLS order)."""
    n = {c: len(idx[c]) for c in CELLS}
    if all(n[c] >= MIN_CELL for c in CELLS):
        return torch.tensor(FACTORIAL[which], dtype=torch.float64)
    plus, minus = (("HR", "HC"), ("LR", "LC")) if which == "h" else (("HR", "LR"), ("HC", "LC"))
    coef = torch.zeros(4, dtype=torch.float64)
    for side, sign in ((plus, 1.0), (minus, -1.0)):
        total = sum(n[c] for c in side if n[c] >= MIN_CELL)
        if total == 0:
            return torch.zeros(4, dtype=torch.float64)
        for c in side:
            if n[c] >= MIN_CELL:
                coef[CELLS.index(c)] = sign * n[c] / total
    return coef


def _groups(idx: Mapping[str, Sequence[int]]) -> Groups:
    """The four cells as a `Groups` (harmless slot = HR, then HC, LR, LC), so noise.py's resampling
    weights apply to them unchanged; a cell below MIN_CELL is left empty."""
    def t(c: str) -> Tensor:
        rows = idx[c] if len(idx[c]) >= MIN_CELL else []
        return torch.tensor(list(rows), dtype=torch.long)

    return Groups(harmless=t("HR"), nodes={"HC": t("HC"), "LR": t("LR")}, unassigned=t("LC"))


@dataclass
class NodeGeometry:
    """One node's directions [L, d] (natural norm), and per-layer statistics."""

    node: str
    h: Tensor
    r: Tensor
    layers: list[int]
    design: str
    counts: dict[str, int]
    table: pd.DataFrame  # one row per layer (see `geometry_rows`)
    extra: dict = field(default_factory=dict)

    def read_layer(self, band: tuple[float, float] = READ_BAND) -> int | None:
        """The layer where the less reliable of the two directions is most reliable (earliest on ties), among
        the layers in `band` (shares of depth) when any was captured there. Why a band: in the first blocks
        the template tokens hardly vary between prompts, so tiny directions there are reliable without
        carrying anything a reader wants to project onto."""
        t = self.table.dropna(subset=["rel_h", "rel_r"])
        if t.empty:
            return None
        depth = max(self.layers) + 1
        inside = t[(t["layer"] >= band[0] * depth) & (t["layer"] < band[1] * depth)]
        t = inside if len(inside) else t
        score = np.minimum(t["rel_h"].to_numpy(), t["rel_r"].to_numpy())
        return int(t["layer"].to_numpy()[int(np.argmax(score))])


def _acts_pair(acts: Activations) -> Tensor:
    """[n, L, 2, d] float64: each layer at the harmfulness and the refusal position."""
    hi, ri = acts.position_index(HARM_POSITION), acts.position_index(REFUSAL_POSITION)
    return acts.acts[:, :, [hi, ri]].double()


def _cell_means(x: Tensor, groups: Groups, weights: list[Tensor] | None) -> Tensor:
    """[R, 4, L, 2, d] in CELLS order (group_means orders harmless(HR), HC, LR, then unassigned(LC))."""
    return group_means(x, groups, weights)


def _directions(means: Tensor, ch: Tensor, cr: Tensor) -> tuple[Tensor, Tensor]:
    """(h [R, L, d] at the harm position, r [R, L, d] at the refusal position)."""
    h = torch.einsum("c,rcld->rld", ch, means[:, :, :, 0])
    r = torch.einsum("c,rcld->rld", cr, means[:, :, :, 1])
    return h, r


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-24)


@torch.inference_mode()
def node_geometry(acts: Activations, node: str, idx: Mapping[str, Sequence[int]], *, n_splits: int = 50,
                  n_boot: int = 200, seed: int = 0, x: Tensor | None = None) -> NodeGeometry:
    """Both directions of one node at every captured layer, with split-half floors and a bootstrap CI of
    their cosine (see the module docstring)."""
    counts = {c: len(idx[c]) for c in CELLS}
    ch, cr = _coefficients(idx, "h"), _coefficients(idx, "r")
    if not ch.abs().sum() or not cr.abs().sum():
        raise AtlasError(f"node {node!r}: harmful or harmless cells are empty ({counts}); nothing to contrast")
    design = "factorial" if all(counts[c] >= MIN_CELL for c in CELLS) else "confounded"
    x = _acts_pair(acts) if x is None else x
    groups = _groups(idx)
    gen = torch.Generator().manual_seed(seed)
    h, r = _directions(_cell_means(x, groups, None), ch, cr)
    w_split = [w.double() for w in split_half_weights(groups, n_splits, gen)]
    sh_h, sh_r = _directions(_cell_means(x, groups, w_split), ch, cr)
    split_h = _cos(sh_h[0::2], sh_h[1::2])  # [S, L]
    split_r = _cos(sh_r[0::2], sh_r[1::2])
    w_boot = [w.double() for w in bootstrap_weights(groups, n_boot, gen)]
    bh, br = _directions(_cell_means(x, groups, w_boot), ch, cr)
    cos = _cos(h[0], r[0])  # [L]
    ci = _basic_ci(cos.float(), _cos(bh, br).float())  # [L, 2]
    floor_h, floor_r = split_h.mean(0), split_r.mean(0)
    rel_h, rel_r = spearman_brown(floor_h), spearman_brown(floor_r)
    scale = (rel_h * rel_r).sqrt()
    rows = []
    for j, layer in enumerate(acts.layers):
        s = float(scale[j])
        rows.append({
            "node": node, "layer": layer, "cos": float(cos[j]), "ci_low": float(ci[j, 0]), "ci_high": float(ci[j, 1]),
            "floor_h": float(floor_h[j]), "floor_r": float(floor_r[j]), "rel_h": float(rel_h[j]),
            "rel_r": float(rel_r[j]),
            "cos_disattenuated": float(cos[j]) / s if s > 0 else math.nan,
            "dis_ci_low": float(ci[j, 0]) / s if s > 0 else math.nan,
            "dis_ci_high": float(ci[j, 1]) / s if s > 0 else math.nan,
            "norm_h": float(h[0, j].norm()), "norm_r": float(r[0, j].norm()), "design": design,
        })
    return NodeGeometry(node, h[0].float(), r[0].float(), list(acts.layers), design, counts, pd.DataFrame(rows))


def harm_refusal_geometry(acts: Activations, nodes: Sequence[str], harmful: Sequence[bool], refused: Sequence[bool],
                          *, n_splits: int = 50, n_boot: int = 200, seed: int = 0,
                          skip: Sequence[str] = ()) -> dict[str, NodeGeometry]:
    """`node_geometry` for every node with harmful prompts, and for `ALL`; nodes without a harmful or a
    harmless prompt are left out (their cell counts still appear in `cell_table`)."""
    if len(nodes) != len(acts) or len(harmful) != len(acts) or len(refused) != len(acts):
        raise AtlasError(f"{len(acts)} activations but {len(nodes)} nodes, {len(harmful)} harm labels and "
                         f"{len(refused)} refusal labels")
    x = _acts_pair(acts)
    out = {}
    for k, (node, idx) in enumerate(cell_indices(nodes, harmful, refused).items()):
        if node in skip:
            continue
        if not (len(idx["HR"]) + len(idx["HC"]) >= MIN_CELL and len(idx["LR"]) + len(idx["LC"]) >= MIN_CELL):
            continue
        if not (len(idx["HR"]) + len(idx["LR"]) >= MIN_CELL and len(idx["HC"]) + len(idx["LC"]) >= MIN_CELL):
            continue
        try:
            out[node] = node_geometry(acts, node, idx, n_splits=n_splits, n_boot=n_boot, seed=seed + k, x=x)
        except AtlasError:
            # too few prompts in the cells the contrast needs: the node stays in `cell_table` (its n per cell
            # says why) and gets no geometry, rather than ending the whole stage
            continue
    return out


# --------------------------------------------------------------------------------------------
# Projections
# --------------------------------------------------------------------------------------------


def projection_rows(acts: Activations, geom: NodeGeometry, layer: int, groups: Mapping[str, Sequence[int]],
                    baseline: Sequence[int], *, n_boot: int = 200, seed: int = 0) -> list[dict]:
    """Mean projection of each group's prompts onto the node's unit h (at the harm position) and unit r
    (at the refusal position), relative to the `baseline` prompts' mean (harmless × complied: 0 means
    "looks like an answered harmless request"), with a percentile bootstrap 95 % CI over prompts."""
    j = geom.layers.index(layer)
    li = acts.layer_index(layer)
    out = []
    rng = np.random.default_rng(seed)
    for which, pos, vec in (("harmfulness", HARM_POSITION, geom.h[j]), ("refusal", REFUSAL_POSITION, geom.r[j])):
        xs = acts.acts[:, li, acts.position_index(pos)].double()
        u = (vec / vec.norm().clamp_min(1e-12)).double()
        base = xs[list(baseline)].mean(0) if len(baseline) else torch.zeros_like(u)
        proj = ((xs - base) @ u).numpy()
        for name, rows in groups.items():
            rows = list(rows)
            rec = {"node": geom.node, "layer": layer, "direction": which, "group": name, "n": len(rows),
                   "mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "too_small": len(rows) < MIN_READ}
            if rows:
                vals = proj[rows]
                rec["mean"] = float(vals.mean())
                if len(rows) >= 2:
                    boots = vals[rng.integers(0, len(rows), size=(n_boot, len(rows)))].mean(1)
                    rec["ci_low"], rec["ci_high"] = (float(q) for q in np.quantile(boots, [0.025, 0.975]))
            out.append(rec)
    return out
