"""The verdict per node on "are harmfulness and refusal represented separately?", by a stated rule.

The rule (`RULE_NAME`, text in `RULE_TEXT`) reads the geometry first and lets a causal check that is
informative confirm it or, where it disagrees, make the answer inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from refusal_atlas.mechinterp.harm_refusal import CELLS, MIN_READ, RELIABLE

RULE_NAME = "harm_refusal_v1"
SAME = 0.8  # a disattenuated cosine at or above this is "one direction seen twice"
INDUCE_SAME = 0.8  # h induces at least this share of what r induces: the same lever
INDUCE_APART = 0.5  # h induces less than this share: a different lever
RULE_TEXT = (
    f"Per node, with every one of the four cells holding at least {MIN_READ} prompts: over the layers where both "
    f"directions have split-half reliability >= {RELIABLE}, the harmfulness/refusal cosine is disattenuated "
    f"(divided by sqrt(rel_h * rel_r)). Geometry says 'separate' when the disattenuated cosine's bootstrap upper "
    f"bound is below {SAME} at more than half of those layers, 'entangled' when its lower bound is at least {SAME} "
    f"at more than half, otherwise nothing. The causal check is informative when adding the refusal direction to "
    f"harmless prompts raises their refusal log-odds (95% CI above 0); then adding the harmfulness direction (same "
    f"norm) says 'entangled' if it raises them by at least {INDUCE_SAME:.0%} as much, 'separate' if by less than "
    f"{INDUCE_APART:.0%}. Verdict: the geometry's answer unless the informative causal check gives the opposite one; "
    f"'inconclusive' when a cell is too small, fewer than 2 layers are reliable, the geometry says nothing, or the "
    f"two disagree.")
QUESTION = "harmfulness_vs_refusal"
TITLE = "Are harmfulness and refusal represented separately?"


def geometry_call(table: pd.DataFrame) -> tuple[str | None, dict]:
    """('separate' | 'entangled' | None, evidence) from one node's per-layer table."""
    rel = table[(table["rel_h"] >= RELIABLE) & (table["rel_r"] >= RELIABLE)]
    rel = rel.dropna(subset=["dis_ci_low", "dis_ci_high"])
    n = len(rel)
    distinct = int((rel["dis_ci_high"] < SAME).sum())
    same = int((rel["dis_ci_low"] >= SAME).sum())
    evidence = {"reliable_layers": [int(x) for x in rel["layer"]], "distinct_layers": distinct, "same_layers": same}
    if n < 2:
        return None, evidence
    if distinct > n / 2:
        return "separate", evidence
    if same > n / 2:
        return "entangled", evidence
    return None, evidence


def causal_call(rows: Sequence[dict]) -> tuple[str | None, dict]:
    """('separate' | 'entangled' | None, evidence) from `causal_checks` rows of one node."""
    pick = {(r["intervention"], r["measure"]): r for r in rows}
    add_r, add_h = pick.get(("add_r", "refusal_logodds")), pick.get(("add_h", "refusal_logodds"))
    evidence: dict = {}
    if add_r is None or add_h is None:
        return None, {"informative": False, "reason": "not run"}
    evidence = {"induce_r": add_r["delta"], "induce_r_ci": [add_r["ci_low"], add_r["ci_high"]],
                "induce_h": add_h["delta"], "induce_h_ci": [add_h["ci_low"], add_h["ci_high"]]}
    for key, name in (("judge_h", "add_h"), ("judge_r", "add_r")):
        j = pick.get((name, "judgement_logodds"))
        if j is not None:
            evidence[key] = j["delta"]
            evidence[key + "_ci"] = [j["ci_low"], j["ci_high"]]
    lo = add_r["ci_low"]
    if lo is None or (isinstance(lo, float) and math.isnan(lo)) or lo <= 0:
        evidence["informative"] = False
        return None, evidence
    evidence["informative"] = True
    ratio = add_h["delta"] / add_r["delta"]
    evidence["induce_ratio"] = ratio
    if ratio >= INDUCE_SAME:
        return "entangled", evidence
    if ratio < INDUCE_APART:
        return "separate", evidence
    return None, evidence


def node_verdict(node: str, counts: dict[str, int], table: pd.DataFrame, causal_rows: Sequence[dict],
                 read_layer: int | None) -> dict:
    """One findings row (see the module docstring for the rule)."""
    geo, geo_ev = geometry_call(table)
    cau, cau_ev = causal_call(causal_rows)
    small = [c for c in CELLS if counts.get(c, 0) < MIN_READ]
    if small:
        verdict, why = "inconclusive", f"cell(s) {', '.join(small)} below {MIN_READ} prompts"
    elif geo is None:
        verdict, why = "inconclusive", "the geometry does not decide"
    elif cau is not None and cau != geo:
        verdict, why = "inconclusive", f"geometry says {geo}, the causal check says {cau}"
    else:
        verdict = geo
        why = "geometry and causal check agree" if cau == geo else (
            "geometry; causal check uninformative" if not cau_ev.get("informative")
            else "geometry; causal check undecided")
    row = table[table["layer"] == read_layer] if read_layer is not None else table.iloc[0:0]
    value = float(row["cos_disattenuated"].iloc[0]) if len(row) else math.nan
    ci = [float(row["dis_ci_low"].iloc[0]), float(row["dis_ci_high"].iloc[0])] if len(row) else [math.nan, math.nan]
    n = int(sum(counts.get(c, 0) for c in CELLS))
    cells = "/".join(str(counts.get(c, 0)) for c in CELLS)
    parts = [f"{node}: harmfulness and refusal {'are ' + verdict if verdict != 'inconclusive' else 'inconclusive'}"
             f" ({why}); disattenuated cosine {value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] at layer {read_layer}"
             f", distinct at {geo_ev['distinct_layers']}/{len(geo_ev['reliable_layers'])} reliable layers"]
    if cau_ev.get("informative"):
        parts.append(f"adding h induced {cau_ev['induce_ratio']:.0%} of the refusal r induces")
    parts.append(f"n = {n} (HR/HC/LR/LC {cells}); rule {RULE_NAME}")
    return {"question": QUESTION, "title": TITLE, "subject": node, "verdict": verdict,
            "sentence": "; ".join(parts) + ".", "rule": RULE_NAME, "rule_text": RULE_TEXT,
            "value": None if math.isnan(value) else round(value, 4),
            "ci": [None if math.isnan(v) else round(v, 4) for v in ci], "n": n, "trusted": False,
            "evidence": "harm-vs-refusal", "details": {"geometry": geo, "causal": cau, "cells": counts,
                                                       "read_layer": read_layer, **geo_ev,
                                                       **{k: v for k, v in cau_ev.items()}}}
