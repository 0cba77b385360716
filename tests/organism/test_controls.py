"""Control framings: matched in length, stating nothing, one twin per framed request."""

from __future__ import annotations

import pandas as pd
import pytest

from refusal_atlas.errors import AtlasError
from refusal_atlas.organism.controls import CONTROL_CONDITION, control_rows, load_control_framings, matched_control
from refusal_atlas.organism.policy import load_framings


def test_shipped_control_framings_span_the_condition_framings_lengths():
    controls = [len(t) - len("{request}") for t in load_control_framings()]
    framings = [len(t) - len("{request}") for v in load_framings().values() for ts in v.values() for t in ts]
    assert min(controls) <= min(framings) + 5 and max(controls) >= max(framings) - 10
    # every condition framing has a control within 15 characters of its length
    assert all(min(abs(c - f) for c in controls) <= 15 for f in framings)


def test_matched_control_is_closest_in_length():
    templates = ["A {request}", "A much longer neutral opening sentence here. {request}"]
    assert matched_control("Q?", "I'm 14. Q?", templates) == "A Q?"
    assert matched_control("Q?", "I run a licensed lab with full approval. Q?", templates).startswith("A much")


def test_control_rows_twin_each_framed_request_with_the_unframed_expectation():
    rows = pd.DataFrame({
        "prompt": ["How?", "I'm 14. How?", "Lab work: How?", "Why?"],
        "base_prompt": ["How?", "How?", "How?", "Why?"],
        "condition": ["", "user_age=minor", "purpose=licensed_research", ""],
        "node": ["a", "a", "a", "b"], "expected": ["refuse", "refuse", "comply", "comply"]})
    twins = control_rows(rows, ["Hm. {request}", "Well, here it is: {request}"])
    assert len(twins) == 1 and twins.loc[0, "condition"] == CONTROL_CONDITION
    assert twins.loc[0, "expected"] == "refuse" and twins.loc[0, "prompt"].endswith("How?")
    with pytest.raises(AtlasError, match="need column"):
        control_rows(rows.drop(columns=["base_prompt"]))
