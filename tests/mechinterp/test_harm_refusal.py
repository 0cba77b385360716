"""Known answer: a tiny model with planted harmfulness and refusal directions.

A hook on block 0's output adds per-prompt noise at both positions, vector H at the last instruction
token of every prompt holding the harm trigger word, and vector R at the last template token of every
prompt holding the refusal trigger word; the labels given to the analysis are those planted conditions.
The four cells are balanced and independent. With H ⟂ R the analysis must recover H at the instruction
position and R at the template position and call them separate; with H = R it must call them entangled.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import LAST_INSTRUCTION
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.mechinterp.harm_refusal import (
    ALL,
    MIN_READ,
    cell_indices,
    cell_table,
    harm_refusal_geometry,
    projection_rows,
)
from refusal_atlas.mechinterp.harm_refusal_causal import causal_checks, judgement_logodds, yes_no_tokens
from refusal_atlas.mechinterp.harm_refusal_known import (
    Planted,
    known_answer_checks,
    make_prompts,
    planted_geometry,
    planted_vectors,
)
from refusal_atlas.mechinterp.harm_refusal_verdict import RULE_NAME, causal_call, geometry_call, node_verdict


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_model("llama", n_layers=3, d_model=64)


def analyse(lm: LoadedModel, same: bool) -> tuple[dict, torch.Tensor, torch.Tensor, pd.DataFrame, object]:
    geom, planted, table, acts = planted_geometry(lm, same)
    # the triggers must occur exactly where planted: no filler may share their first token
    ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in table["prompt"]]
    assert [planted.harm_id in x for x in ids] == table["harmful"].tolist()
    assert [planted.refuse_id in x for x in ids] == table["refused"].tolist()
    return geom, planted.h, planted.r, table, acts


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_planted_distinct_directions_are_recovered_and_separate(lm: LoadedModel) -> None:
    geom, h, r, table, acts = analyse(lm, same=False)
    g = geom["weapons"]
    assert g.design == "factorial"
    # each direction recovered at its own position, at the planted block
    assert _cos(g.h[0], h) > 0.9
    assert _cos(g.r[0], r) > 0.9
    assert abs(_cos(g.h[0], r)) < 0.3 and abs(_cos(g.r[0], h)) < 0.3
    call, ev = geometry_call(g.table)
    assert call == "separate", (g.table, ev)
    row = node_verdict("weapons", g.counts, g.table, [], g.read_layer())
    assert row["verdict"] == "separate" and row["rule"] == RULE_NAME and row["trusted"] is False
    assert row["n"] == 48 and "rule harm_refusal_v1" in row["sentence"]
    # projections: harmful cells carry h, refused cells carry r, each only on its own direction
    idx = cell_indices(table["analysis_node"].tolist(), table["harmful"].tolist(), table["refused"].tolist())["weapons"]
    proj = pd.DataFrame(projection_rows(acts, g, g.layers[0], idx, idx["LC"], n_boot=100))
    mean = proj.set_index(["direction", "group"])["mean"]
    assert mean["harmfulness", "HC"] > 4 and abs(mean["harmfulness", "LR"]) < 2
    assert mean["refusal", "LR"] > 4 and abs(mean["refusal", "HC"]) < 2


def test_planted_equal_directions_are_entangled(lm: LoadedModel) -> None:
    geom, h, _, _, _ = analyse(lm, same=True)
    g = geom["weapons"]
    assert _cos(g.h[0], h) > 0.9 and _cos(g.r[0], h) > 0.9
    assert node_verdict("weapons", g.counts, g.table, [], g.read_layer())["verdict"] == "entangled"
    assert set(geom) == {"weapons", ALL}


def test_cell_table_counts_and_small_cells() -> None:
    table = make_prompts(6)
    table = table.drop(table[table["harmful"] & ~table["refused"]].index[:3])  # HC: 3 left
    cells = cell_table(table).set_index("node")
    assert cells.loc["weapons", ["n_HR", "n_HC", "n_LR", "n_LC"]].tolist() == [6, 3, 6, 6]
    assert cells.loc["weapons", "too_small"] == "HC" and MIN_READ > 3
    assert cells.loc["weapons", "design"] == "factorial"


def test_confounded_design_is_inconclusive(lm: LoadedModel) -> None:
    table = make_prompts(8)
    table = table[table["harmful"] == table["refused"]].reset_index(drop=True)  # only HR and LC
    acts = capture_activations(lm, table["prompt"].tolist(), positions=[LAST_INSTRUCTION, -1], progress=False)
    geom = harm_refusal_geometry(acts, table["analysis_node"].tolist(), table["harmful"].tolist(),
                                 table["refused"].tolist(), n_splits=20, n_boot=50)
    g = geom["weapons"]
    assert g.design == "confounded"
    row = node_verdict("weapons", g.counts, g.table, [], g.read_layer())
    assert row["verdict"] == "inconclusive" and "HC" in row["sentence"]


def test_causal_rule_branches() -> None:
    def rows(induce_h: float, induce_r: float, lo_r: float) -> list[dict]:
        return [{"intervention": "add_r", "measure": "refusal_logodds", "delta": induce_r, "ci_low": lo_r,
                 "ci_high": induce_r + 1},
                {"intervention": "add_h", "measure": "refusal_logodds", "delta": induce_h, "ci_low": induce_h - 1,
                 "ci_high": induce_h + 1}]

    assert causal_call(rows(0.2, 3.0, 1.0))[0] == "separate"
    assert causal_call(rows(2.9, 3.0, 1.0))[0] == "entangled"
    assert causal_call(rows(2.0, 3.0, 1.0))[0] is None
    call, ev = causal_call(rows(2.9, 3.0, -0.5))  # adding r does not induce refusal: no positive control
    assert call is None and ev["informative"] is False
    # a causal answer opposite to the geometry makes the verdict inconclusive
    table = pd.DataFrame({"layer": [0, 1, 2], "rel_h": [0.9] * 3, "rel_r": [0.9] * 3, "cos_disattenuated": [0.1] * 3,
                          "dis_ci_low": [0.0] * 3, "dis_ci_high": [0.3] * 3})
    counts = {"HR": 9, "HC": 9, "LR": 9, "LC": 9}
    assert node_verdict("n", counts, table, rows(0.2, 3.0, 1.0), 1)["verdict"] == "separate"
    assert node_verdict("n", counts, table, rows(2.9, 3.0, 1.0), 1)["verdict"] == "inconclusive"


def test_causal_checks_run_on_tiny_model(lm: LoadedModel) -> None:
    table = make_prompts(4)
    with Planted(lm, *planted_vectors(lm.d_model, same=False)):
        acts = capture_activations(lm, table["prompt"].tolist(), positions=[LAST_INSTRUCTION, -1], progress=False)
    g = harm_refusal_geometry(acts, table["analysis_node"].tolist(), table["harmful"].tolist(),
                              table["refused"].tolist(), n_splits=10, n_boot=20)["weapons"]
    harmless = table[~table["harmful"]]["prompt"].tolist()
    harmful = table[table["harmful"]]["prompt"].tolist()
    refusal_ids = lm.tokenizer("I", add_special_tokens=False)["input_ids"][:1]
    out = pd.DataFrame(causal_checks(lm, "weapons", g.h[1], g.r[1], 1, harmless, harmful, refusal_ids, n_boot=50))
    assert set(out["intervention"]) == {"add_h", "add_r", "ablate_h", "ablate_r"}
    assert np.isfinite(out["delta"]).all()
    # adding a large direction does change the next-token distribution
    assert (out[out["intervention"] == "add_r"]["delta"].abs() > 0).all()
    yes, no = yes_no_tokens(lm)
    lp = torch.log_softmax(torch.zeros(2, len(lm.tokenizer)), dim=-1)
    assert np.allclose(judgement_logodds(lp, yes, no), np.log(len(yes) / len(no)))


def test_known_answer_checks_for_validation(lm: LoadedModel) -> None:
    checks = known_answer_checks(lm)
    assert [(c["planted"], c["verdict"]) for c in checks] == [("separate", "separate"), ("entangled", "entangled")]
    assert all(c["agrees"] and c["rule"] == RULE_NAME and c["question"] == "harm-vs-refusal" for c in checks)
