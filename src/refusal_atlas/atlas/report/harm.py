"""The harmfulness-vs-refusal section: the 2×2 cells per node, the cosine of the two directions against their
floors, the projections of every group (plain, jailbroken, over-refused) and the stage's figure."""

from __future__ import annotations

import base64

import pandas as pd

from refusal_atlas.atlas.report.html import df_table, esc, not_run
from refusal_atlas.atlas.store import AtlasStore

__all__ = ["section_harm"]


def _geometry_summary(geo: pd.DataFrame) -> pd.DataFrame:
    """Per node: the layer where the disattenuated cosine is lowest, with both directions' floors there."""
    rows = []
    for node, g in geo.groupby("node", sort=True):
        g = g.dropna(subset=["cos"])
        if not len(g):
            continue
        best = g.loc[g["cos"].abs().idxmin()]
        rows.append({"node": node, "layers": len(g), "cos_min_layer": int(best["layer"]), "cos": best["cos"],
                     "ci_low": best["ci_low"], "ci_high": best["ci_high"], "floor_h": best["floor_h"],
                     "floor_r": best["floor_r"], "cos_max": g["cos"].max(), "design": best.get("design", "")})
    return pd.DataFrame(rows)


def section_harm(store: AtlasStore) -> str:
    cells = store.harm_cells
    if cells is None:
        return not_run("harm/cells.csv", "refusal-atlas run (harm stage)")
    parts = ["<h3>The four cells per branch (n)</h3>",
             "<p class='small'>HR harmful and refused, HC harmful and complied, LR harmless and refused, LC harmless "
             "and complied (harmless cells are pooled over branches; *_own are the branch's own over-refusal "
             "probes). <code>too_small</code> names the cells too small to read.</p>",
             df_table(cells)]
    geo = store.harm_geometry
    if geo is not None and len(geo):
        parts += ["<h3>Harmfulness vs refusal direction: cosine per branch against the split-half floors</h3>",
                  "<p class='small'>Harmfulness is read at the last instruction token, refusal at the last template "
                  "token. A cosine well below both floors means two directions; near the floors, one.</p>",
                  df_table(_geometry_summary(geo))]
    causal = store.harm_causal
    if causal is not None and len(causal):
        parts += ["<h3>Causal checks</h3>", df_table(causal)]
    proj = store.harm_projections
    if proj is not None and len(proj):
        parts += ["<h3>Projections of each group onto each direction</h3>",
                  "<p class='small'>Mean projection relative to harmless × complied, with a bootstrap 95% interval: "
                  "does a jailbreak or a loosening condition lower harmfulness, refusal, or both?</p>",
                  df_table(proj, max_rows=200)]
    figure = store.harm_projection_figure
    if figure is not None:
        data = base64.b64encode(figure.read_bytes()).decode("ascii")
        parts.append(f"<figure><img class='fig' alt='{esc(figure.name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(figure.name)}</figcaption></figure>")
    return "".join(parts)
