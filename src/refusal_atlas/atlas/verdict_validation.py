"""Validation of the verdict rules on models whose answer is known, and the table for the README.

Three known answers: the base model never refuses (every question: "no refusal to analyse"); the
shared organism has one refusal decision for every branch (every pair of refusing branches: "one
shared mechanism"); the separable organism has two branches planted in disjoint bands of blocks
(their pair: "separable components"; each acts in blocks that meet its own band and no other planted
band — block indices on both sides, so no offset). A rule is trusted when it agreed everywhere it had
a planted answer. Beside the verdicts, the SAE stage's feature sets of the separable organism's planted pair
(`check_sae`): above the chance bound on the shared organism, not above it on the separable one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.atlas.verdict_figures import Finding
from refusal_atlas.atlas.verdict_rules import NO_REFUSAL, SEPARABLE, SHARED, acting_bands


@dataclass
class Check:
    """One planted answer set beside the verdict the toolkit gave."""

    model: str
    question: str
    subject: str
    rule: str
    planted: str
    verdict: str
    agrees: bool

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "question": self.question, "subject": self.subject, "rule": self.rule,
                "planted": self.planted, "verdict": self.verdict, "agrees": self.agrees}


def check_base(findings: list[Finding]) -> list[Check]:
    """The base model never refuses: every finding must say so."""
    return [Check("base", f.question, f.subject, f.rule, NO_REFUSAL, f.verdict, f.verdict == NO_REFUSAL)
            for f in findings] or [Check("base", "(all)", "model", "no-refusal", NO_REFUSAL, "(no findings)", False)]


def check_shared(findings: list[Finding]) -> list[Check]:
    """One refusal decision for every branch: every pair of refusing branches shares it."""
    pairs = [f for f in findings if f.question == "shared-vs-separable" and " and " in f.subject]
    if not pairs:
        return [Check("shared", "shared-vs-separable", "(no pair of refusing branches)", "component-removal", SHARED,
                      "(no pair)", False)]
    return [Check("shared", f.question, f.subject, f.rule, SHARED, f.verdict, f.verdict == SHARED) for f in pairs]


def check_separable(findings: list[Finding], truth: dict[str, Any]) -> list[Check]:
    """The planted pair is separable, each planted branch acts where it was planted, the rest refuse nothing."""
    branches: dict[str, dict[str, Any]] = truth.get("branches", {})
    names = sorted(branches)
    out: list[Check] = []
    by = {(f.question, f.subject): f for f in findings}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            f = by.get(("shared-vs-separable", f"{a} and {b}"))
            out.append(Check("separable", "shared-vs-separable", f"{a} and {b}", "component-removal", SEPARABLE,
                             f.verdict if f else "(not measured)", bool(f and f.verdict == SEPARABLE)))
    for a in names:
        lo, hi = branches[a]["band"]
        planted = f"acts in blocks within {lo}-{hi - 1}, none of another planted band"
        f = by.get(("where-it-acts", a))
        runs = acting_bands(f.verdict) if f else []
        others = [branches[b]["band"] for b in names if b != a]
        meets = any(r_lo <= hi - 1 and r_hi >= lo for r_lo, r_hi in runs)
        trespasses = any(r_lo <= o_hi - 1 and r_hi >= o_lo for r_lo, r_hi in runs for o_lo, o_hi in others)
        out.append(Check("separable", "where-it-acts", a, "restoration-band", planted,
                         f.verdict if f else "(not measured)", meets and not trespasses))
    # no check on the branches it was not trained to refuse: the middle band's refusal spreads to them (measured,
    # docs/decisions.md), so their planted answer is not known
    return out


SAE_RULE = "sae-jaccard"
SAE_QUESTION = "sae-feature-overlap"


def check_sae(model: str, pairs: pd.DataFrame | None, a: str, b: str, *, overlap: bool) -> Check:
    """The K* feature sets of `a` and `b` (the stage's `sae/jaccard.parquet`) against the planted answer:
    `overlap` True, Jaccard above the chance bound of two random K*-subsets of their candidate pools; False,
    not above it (what two separately planted refusals should give)."""
    planted = "feature sets overlap beyond chance" if overlap else "feature sets not above chance"
    subject = f"{a} and {b}"
    row = (pairs[((pairs["node_a"] == a) & (pairs["node_b"] == b)) | ((pairs["node_a"] == b) & (pairs["node_b"] == a))]
           if pairs is not None and len(pairs) else pd.DataFrame())
    if row.empty:
        return Check(model, SAE_QUESTION, subject, SAE_RULE, planted, "(not measured)", False)
    r = row.iloc[0]
    above = bool(r["overlapping"])
    verdict = (f"Jaccard {r['jaccard']:.3f} (95% CI {r['ci_low']:.3f} to {r['ci_high']:.3f}) "
               f"{'above' if above else 'not above'} the chance bound {r['chance_95']:.3f}")
    return Check(model, SAE_QUESTION, subject, SAE_RULE, planted, verdict, above == overlap)


def trusted_rules(checks: list[Check]) -> list[str]:
    """Rules with at least one planted answer and no disagreement."""
    seen: dict[str, bool] = {}
    for c in checks:
        seen[c.rule] = seen.get(c.rule, True) and c.agrees
    return sorted(r for r, ok in seen.items() if ok)


def markdown_table(checks: list[Check]) -> str:
    """The validation table for the README (one row per planted answer)."""
    lines = ["| model | question | subject | planted | verdict | agrees |", "|---|---|---|---|---|---|"]
    for c in checks:
        cells = [c.model, c.question, c.subject, c.planted, c.verdict, "yes" if c.agrees else "**no**"]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines) + "\n"


def summary(checks: list[Check]) -> dict[str, Any]:
    per_model: dict[str, dict[str, int]] = {}
    for c in checks:
        m = per_model.setdefault(c.model, {"checks": 0, "agree": 0})
        m["checks"] += 1
        m["agree"] += int(c.agrees)
    return {"per_model": per_model, "all_agree": all(c.agrees for c in checks) and bool(checks),
            "trusted_rules": trusted_rules(checks)}


def findings_of(path: Path) -> list[Finding]:
    """Findings back from a findings.json (the shape `write_findings` writes)."""
    data = json.loads(Path(path).read_text())
    return [Finding(f["question"], f["title"], f["subject"], f["verdict"], f["sentence"], f["rule"], f["rule_text"],
                    f["value"], tuple(f["ci"]) if f["ci"] else None, f["n"], f["trusted"], f["evidence"])
            for f in data["findings"]]
