"""Known answer: a tiny model with planted harmfulness and refusal directions.

A hook on block 0's output adds per-prompt noise at both positions, vector H at the last instruction
token of every prompt holding the harm trigger word, and vector R at the last template token of every
prompt holding the refusal trigger word; the labels given to the analysis are those planted conditions.
The four cells are balanced and independent. With H ⟂ R the analysis must recover H at the instruction
position and R at the template position and call them separate; with H = R it must call them entangled.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output, replace_hidden
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import LAST_INSTRUCTION, post_instruction_positions
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
from refusal_atlas.mechinterp.harm_refusal_verdict import RULE_NAME, causal_call, geometry_call, node_verdict

HARM_WORD, REFUSE_WORD = " gun", " wifi"
SIGMA = 0.6  # per-coordinate noise: ~4.8 per prompt against planted vectors of norm 6
FILLERS = ("bread", "sea", "poem", "recipe", "capital", "novel", "plot", "water", "salt", "home", "simple",
           "sky", "flour", "yeast", "three", "sentences", "France", "Paris", "summarise", "explain")


def make_prompts(n_per_cell: int, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for harmful in (True, False):
        for refused in (True, False):
            for _ in range(n_per_cell):
                words = rng.sample(FILLERS, 5)
                if harmful:
                    words.insert(rng.randrange(1, 4), HARM_WORD.strip())
                if refused:
                    words.insert(rng.randrange(1, 4), REFUSE_WORD.strip())
                rows.append({"prompt": "Tell me about " + " ".join(words) + " please",
                             "harmful": harmful, "refused": refused,
                             "analysis_node": "weapons" if harmful else ""})
    return pd.DataFrame(rows)


class Planted:
    """Hooks adding H / R at their positions where their trigger token occurs (installed as a context)."""

    def __init__(self, lm: LoadedModel, h: torch.Tensor, r: torch.Tensor) -> None:
        tok = lm.tokenizer
        self.harm_id = tok(HARM_WORD, add_special_tokens=False)["input_ids"][0]
        self.refuse_id = tok(REFUSE_WORD, add_special_tokens=False)["input_ids"][0]
        self.lm, self.h, self.r = lm, h, r
        self.last_instruction = post_instruction_positions(lm)[0] - 1
        self.ids: torch.Tensor | None = None

    def noise(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-prompt Gaussian noise [B, 2, d], seeded by the prompt's own tokens (padding dropped), so the
        directions have a real noise floor and a prompt gets the same noise in any batch."""
        pad = self.lm.tokenizer.pad_token_id
        out = []
        for row in ids:
            seed = zlib.crc32(str(row[row != pad].tolist()).encode())
            out.append(torch.randn(2, self.h.shape[0], generator=torch.Generator().manual_seed(seed)))
        return SIGMA * torch.stack(out)

    def __enter__(self) -> Planted:
        def stash(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.ids = kwargs.get("input_ids", args[0] if args else None)

        def plant(module: torch.nn.Module, args: tuple, output: object) -> object:
            hidden = hidden_from_output(output).clone()
            if self.ids is None or self.ids.shape[1] < -self.last_instruction:
                return output
            harm = (self.ids == self.harm_id).any(1)
            refuse = (self.ids == self.refuse_id).any(1)
            hidden[harm, self.last_instruction] += self.h
            hidden[refuse, -1] += self.r
            hidden[:, [self.last_instruction, -1]] += self.noise(self.ids)
            return replace_hidden(output, hidden)

        self.handles = [self.lm.model.register_forward_pre_hook(stash, with_kwargs=True),
                        decoder_blocks(self.lm.model)[0].register_forward_hook(plant, prepend=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def planted_vectors(d: int, same: bool, norm: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(3)))
    h = norm * q[:, 0]
    return h, (h.clone() if same else norm * q[:, 1])


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_model("llama", n_layers=3, d_model=64)


def analyse(lm: LoadedModel, same: bool) -> tuple[dict, torch.Tensor, torch.Tensor, pd.DataFrame, object]:
    table = make_prompts(12)
    # the triggers must occur exactly where planted: no filler may share their first token
    ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in table["prompt"]]
    planted = Planted(lm, *planted_vectors(lm.d_model, same))
    assert [planted.harm_id in x for x in ids] == table["harmful"].tolist()
    assert [planted.refuse_id in x for x in ids] == table["refused"].tolist()
    with planted:
        acts = capture_activations(lm, table["prompt"].tolist(), positions=[LAST_INSTRUCTION, -1], progress=False)
    geom = harm_refusal_geometry(acts, table["analysis_node"].tolist(), table["harmful"].tolist(),
                                 table["refused"].tolist(), n_splits=30, n_boot=100, seed=0)
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
