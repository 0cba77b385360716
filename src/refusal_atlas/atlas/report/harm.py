"""The harmfulness-vs-refusal section: the 2×2 cells per node, the verdict per node, the cosine of the two
directions against their floors, the causal checks, the projections of every group (plain, loosening,
jailbroken, over-refused) and the stage's figure."""

from __future__ import annotations

import base64
import math
from typing import Any

import pandas as pd

from refusal_atlas.atlas.report.html import df_table, esc, not_run
from refusal_atlas.atlas.store import AtlasStore

__all__ = ["section_harm"]

CELL_NOTE = ("HR harmful and refused, HC harmful and complied, LR harmless and refused, LC harmless and complied. "
             "The harmless cells are pooled over branches (a harmless request belongs to no harm source); "
             "<code>n_LR_own</code> / <code>n_LC_own</code> count the over-refusal probes that resemble the branch. "
             "<code>too_small</code> names the cells with fewer than 5 prompts: too small to read, and no verdict "
             "rests on them.")


def _fmt(value: Any, digits: int = 2) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def _interval(mean: Any, low: Any, high: Any) -> str:
    return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]"


def _geometry_summary(geo: pd.DataFrame, findings: list[dict[str, Any]]) -> pd.DataFrame:
    """Per node, at the layer its verdict reads (else the layer of lowest |cos|): the raw and disattenuated
    cosine with CIs, both floors, and over how many reliable layers the directions were distinct."""
    read = {str(f.get("subject")): f.get("details", {}) for f in findings}
    rows = []
    for node, g in geo.groupby("node", sort=True):
        g = g.dropna(subset=["cos"])
        if not len(g):
            continue
        details = read.get(str(node), {})
        reliable = details.get("reliable_layers") or []
        at = g[g["layer"] == details.get("read_layer")] if "read_layer" in details else g.iloc[0:0]
        best = at.iloc[0] if len(at) else g.loc[g["cos"].abs().idxmin()]
        rows.append({"node": node, "layer": int(best["layer"]),
                     "cos [95% CI]": _interval(best["cos"], best["ci_low"], best["ci_high"]),
                     "disattenuated [95% CI]": _interval(best["cos_disattenuated"], best["dis_ci_low"],
                                                         best["dis_ci_high"]),
                     "floor h": _fmt(best["floor_h"]), "floor r": _fmt(best["floor_r"]),
                     "distinct / reliable layers": f"{details.get('distinct_layers', '–')} / {len(reliable)}",
                     "design": best.get("design", "")})
    return pd.DataFrame(rows)


def _projection_summary(proj: pd.DataFrame) -> pd.DataFrame:
    """One row per node and group: n and the mean projection on h and on r with their CIs."""
    rows = []
    for (node, group), g in proj.groupby(["node", "group"], sort=False):
        rec: dict[str, Any] = {"node": node, "group": group, "layer": int(g["layer"].iloc[0]), "n": int(g["n"].max())}
        for which, label in (("harmfulness", "on h"), ("refusal", "on r")):
            part = g[g["direction"] == which]
            rec[label] = _interval(part["mean"].iloc[0], part["ci_low"].iloc[0], part["ci_high"].iloc[0]) \
                if len(part) else "–"
        rec["too small"] = "yes" if rec["n"] < 5 else ""
        rows.append(rec)
    return pd.DataFrame(rows)


def _summary_line(summary: dict[str, Any] | None) -> str:
    if not summary:
        return ""

    def rate(key: str, value: Any) -> str:
        return f"{esc(key)} {float(value['rate']):.2f} (n = {int(value['n'])})" if isinstance(value, dict) else ""

    parts = [rate("plain harmful requests refused", summary.get("plain_harmful_refusal_rate")),
             rate("jailbreak-wrapped refused", summary.get("jailbreak_refusal_rate")),
             rate("tense-rephrased refused", summary.get("tense_refusal_rate"))]
    for group, value in (summary.get("overrefusal_probe_refusal_rate") or {}).items():
        parts.append(rate(f"{group} refused", value))
    sources = ", ".join(f"{esc(k)} {int(v)}" for k, v in (summary.get("rows_by_label_source") or {}).items())
    text = "; ".join(p for p in parts if p)
    return (f"<p class='small'>{int(summary.get('rows', 0))} prompts (labels from: {sources}); {text}. "
            f"Stage time {_fmt(summary.get('seconds'), 0)} s.</p>")


def section_harm(store: AtlasStore) -> str:
    cells = store.harm_cells
    if cells is None:
        return not_run("harm/cells.csv", "refusal-atlas run (harm stage)")
    findings = store.harm_findings
    parts = ["<h3>The four cells per branch (n)</h3>", _summary_line(store.harm_summary),
             f"<p class='small'>{CELL_NOTE}</p>", df_table(cells)]
    if findings:
        verdicts = pd.DataFrame([{"node": f.get("subject"), "verdict": f.get("verdict"), "n": f.get("n"),
                                  "sentence": f.get("sentence")} for f in findings])
        parts += ["<h3>Verdict per branch</h3>", df_table(verdicts)]
    geo = store.harm_geometry
    if geo is not None and len(geo):
        parts += ["<h3>Harmfulness vs refusal direction: cosine against the split-half floors</h3>",
                  "<p class='small'>Harmfulness is read at the last instruction token, refusal at the last template "
                  "token. The disattenuated cosine divides by √(rel_h · rel_r), so 1 means one direction whatever "
                  "the sample sizes; every layer is in <code>harm/geometry.csv</code>.</p>",
                  df_table(_geometry_summary(geo, findings))]
    causal = store.harm_causal
    if causal is not None and len(causal):
        parts += ["<h3>Causal checks</h3>",
                  "<p class='small'>add_h / add_r: the direction (both at r's norm) added to harmless prompts; "
                  "ablate_h / ablate_r: removed from harmful ones. refusal_logodds: the first-token refusal "
                  "log-odds; judgement_logodds: log P(yes) − log P(no) when the model is asked whether the request "
                  "is harmful.</p>", df_table(causal)]
    proj = store.harm_projections
    if proj is not None and len(proj):
        parts += ["<h3>Projections of each group onto each direction</h3>",
                  "<p class='small'>Mean projection relative to harmless × complied, with a bootstrap 95% interval: "
                  "does a jailbreak or a loosening condition lower harmfulness, refusal, or both? Does an "
                  "over-refused harmless prompt carry harmfulness or only refusal?</p>",
                  df_table(_projection_summary(proj), max_rows=300)]
    figure = store.harm_projection_figure
    if figure is not None:
        data = base64.b64encode(figure.read_bytes()).decode("ascii")
        parts.append(f"<figure><img class='fig' alt='{esc(figure.name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(figure.name)}: each group's mean projection on h (x) and r (y) with 95% "
                     f"intervals, per branch</figcaption></figure>")
    return "".join(parts)
