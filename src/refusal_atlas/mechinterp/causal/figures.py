"""Figures of the causal tables: the cross-ablation heatmap and steering by layer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from refusal_atlas.mechinterp.causal.files import write_figure
from refusal_atlas.mechinterp.directions import POOLED

__all__ = ["plot_cross_ablation", "plot_steering"]


def plot_cross_ablation(df: pd.DataFrame, path: str | Path, value: str = "first_token_refusal_rate",
                        method: str = "diff_means") -> Path:
    """Heatmap: rows = ablated direction (baseline and pooled first), columns = target node."""
    sub = df[(df["method"] == method) | df["source"].isin(["none", POOLED])]
    mat = sub.pivot_table(index="source", columns="target", values=value, aggfunc="mean", sort=False)
    order = [s for s in ["none", POOLED] if s in mat.index] + [s for s in mat.index if s not in ("none", POOLED)]
    mat = mat.loc[order]
    # a Figure without pyplot: no global backend is chosen or changed (a notebook keeps its own)
    fig = Figure(figsize=(1.0 + 0.45 * mat.shape[1], 1.2 + 0.35 * mat.shape[0]))
    ax = fig.subplots()
    im = ax.imshow(mat.values, cmap="viridis", aspect="auto", vmin=0 if "rate" in value else None,
                   vmax=1 if "rate" in value else None)
    ax.set_xticks(range(mat.shape[1]), mat.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(mat.shape[0]), [f"ablate {s}" if s != "none" else "no ablation" for s in mat.index],
                  fontsize=7)
    ax.set_xlabel("refusal measured on node")
    ax.set_title(f"cross-ablation ({method}): {value}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return write_figure(fig, path)


def plot_steering(df: pd.DataFrame, path: str | Path, value: str = "induced_refusal_rate") -> Path:
    """Induced refusal by layer, one line per node (first-token refusal where nothing was generated)."""
    col = value if df[value].notna().any() else "first_token_refusal_rate"
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for node, g in df.groupby("node"):
        g = g.sort_values("layer")
        ax.plot(g["layer"], g[col], marker="o", label=node, lw=2.5 if node == POOLED else 1)
    ax.set_xlabel("layer")
    ax.set_ylabel(col)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return write_figure(fig, path)
