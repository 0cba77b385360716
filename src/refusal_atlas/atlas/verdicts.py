"""Verdicts: one answer per question, with its figure, interval, n and the named rule that decided it.

`decide` runs every question's rule (`verdict_rules`) over an atlas folder's figures
(`verdict_figures`); a model with no refusal to analyse gets that verdict for every question,
never a finding. `write_findings` writes `findings.json` (the report's first section) and returns
the `verdicts` block for metrics.json. A rule is `trusted` only when `refusal-atlas validate` has
shown it giving the planted answer on the known-answer organisms (its `trusted_rules`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refusal_atlas.atlas.verdict_figures import Figures, Finding, read_figures
from refusal_atlas.atlas.verdict_rules import (
    NO_REFUSAL,
    QUESTION_RULE,
    QUESTION_RULES,
    QUESTIONS,
    RULES,
    finding,
    no_refusal_reason,
)
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write_json

FINDINGS_JSON = "findings.json"

__all__ = ["FINDINGS_JSON", "NO_REFUSAL", "QUESTIONS", "RULES", "decide", "load_trusted_rules", "verdict_metrics",
           "write_findings"]


def decide(fig: Figures, trusted_rules: Iterable[str] = ()) -> list[Finding]:
    """Every question's findings, in question order (rule no-refusal first: it overrides the others)."""
    trusted = set(trusted_rules)
    reason = no_refusal_reason(fig)
    if reason is not None:
        out = []
        for q in QUESTIONS:
            f = finding(q, "model", NO_REFUSAL, reason)
            f.rule, f.rule_text = "no-refusal", RULES["no-refusal"]
            f.sentence = f"model: {NO_REFUSAL} — {reason} [rule no-refusal]."
            out.append(f)
    else:
        out = [f for q in QUESTIONS for f in QUESTION_RULES[q](fig)]
    for f in out:
        f.trusted = f.rule in trusted
    return out


def verdict_metrics(findings: list[Finding]) -> dict[str, Any]:
    """The `verdicts` block of metrics.json: counts by verdict, and each question's verdicts by subject."""
    by_q: dict[str, dict[str, str]] = {}
    for f in findings:
        by_q.setdefault(f.question, {})[f.subject] = f.verdict
    return {"n_findings": len(findings), "by_verdict": dict(sorted(Counter(f.verdict for f in findings).items())),
            "n_trusted": sum(f.trusted for f in findings), "questions": by_q,
            "rules": {q: QUESTION_RULE[q] for q in QUESTIONS}}


def load_trusted_rules(validation: Path | None) -> list[str]:
    """Rules that gave the planted answer on every known-answer model of a `validate` run (none without one)."""
    if validation is None:
        return []
    path = Path(validation)
    if path.is_dir():
        path = path / "validation.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AtlasError(f"{path}: no validation.json; run `refusal-atlas validate -o DIR` first") from None
    except json.JSONDecodeError as exc:
        raise AtlasError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); rerun `refusal-atlas validate`") from None
    # `validate` writes them under "summary"; a hand-made record may list them at the top
    rules = data.get("trusted_rules") or (data.get("summary") or {}).get("trusted_rules") or []
    return [str(r) for r in rules]


def write_findings(atlas: Path, trusted_rules: Iterable[str] = ()) -> dict[str, Any]:
    """Decide every question on `atlas`'s figures, write `atlas/findings.json`; return the metrics block."""
    findings = decide(read_figures(Path(atlas)), trusted_rules)
    atomic_write_json(Path(atlas) / FINDINGS_JSON, {"findings": [f.to_dict() for f in findings]})
    return verdict_metrics(findings)
