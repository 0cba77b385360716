"""Control framings: the same request wrapped in text of the same length that states nothing.

Why: every condition framing adds words, and added words alone move a small model's refusal (the
shared organism's projection fell by 20-40 units under tightening framings too). A condition's
effect is therefore measured against a control framing of matched length, not the bare request:
`control_rows` gives each framed row a twin whose framing is the control template closest in
length to the one the row received.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from ruamel.yaml import YAML

from refusal_atlas import paths
from refusal_atlas.errors import AtlasError
from refusal_atlas.organism.policy import _pid

CONTROL_CONDITION = "control=neutral"
PLACEHOLDER = "{request}"


def load_control_framings(path: Path | None = None) -> list[str]:
    """Templates from data/prompts/control_framings.yaml, each with {request} exactly once."""
    path = path or paths.prompts_dir() / "control_framings.yaml"
    if not path.is_file():
        raise AtlasError(f"{path}: control framings missing; reinstall refusal-atlas")
    data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8")) or []
    if not isinstance(data, list) or not data:
        raise AtlasError(f"{path}: expected a non-empty list of templates")
    for i, t in enumerate(data, start=1):
        if not isinstance(t, str) or t.count(PLACEHOLDER) != 1 or t.replace(PLACEHOLDER, "").count("{"):
            raise AtlasError(f"{path}: template {i} must contain {PLACEHOLDER} exactly once and no other braces")
    return [str(t) for t in data]


def matched_control(request: str, framed: str, templates: list[str]) -> str:
    """`request` in the control template whose added length is closest to that of `framed` (ties: the first)."""
    added = len(framed) - len(request)
    best = min(templates, key=lambda t: abs(len(t) - len(PLACEHOLDER) - added))
    return best.replace(PLACEHOLDER, request)


def control_rows(rows: pd.DataFrame, templates: list[str] | None = None) -> pd.DataFrame:
    """One control twin per framed row (columns kept; `condition` = control=neutral, `expected` = the
    unframed request's). Input columns: prompt, base_prompt, condition, node; optional expected."""
    need = {"prompt", "base_prompt", "condition", "node"}
    if not need <= set(rows.columns):
        raise AtlasError(f"control rows need column(s) {sorted(need - set(rows.columns))}")
    templates = templates or load_control_framings()
    framed = rows[(rows["condition"].fillna("") != "") & (rows["condition"] != "(none)")]
    twins = framed.drop_duplicates(["base_prompt", "node"]).copy()
    if "expected" in rows:
        plain = rows[rows["condition"].fillna("").isin(["", "(none)"])]
        unframed = dict(zip(zip(plain["base_prompt"], plain["node"], strict=True), plain["expected"], strict=True))
        twins["expected"] = [unframed.get((b, n), e) for b, n, e in
                             zip(twins["base_prompt"], twins["node"], twins["expected"], strict=True)]
    twins["prompt"] = [matched_control(str(b), str(p), templates)
                       for b, p in zip(twins["base_prompt"], twins["prompt"], strict=True)]
    twins["condition"] = CONTROL_CONDITION
    if "prompt_id" in twins:
        twins["prompt_id"] = [_pid(p, CONTROL_CONDITION, str(n)) for p, n in zip(twins["prompt"], twins["node"],
                                                                                    strict=True)]
    return twins.reset_index(drop=True)
