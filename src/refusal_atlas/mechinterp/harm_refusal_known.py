"""Known answer for the harmfulness-vs-refusal rule: a tiny model with planted harmfulness and refusal
directions, analysed the way the harm stage analyses a real one.

A hook on block 0's output adds per-prompt noise at both positions, vector H at the last instruction
token of every prompt holding the harm trigger word, and vector R at the last template token of every
prompt holding the refusal trigger word; the labels given to the analysis are those planted conditions,
with the four cells balanced and independent. With H ⟂ R the rule must answer "separate"; with H = R,
"entangled". `known_answer_checks` runs both and returns one record per planted answer, for `validate`
and for the tests.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import pandas as pd
import torch

from refusal_atlas.lm.blocks import BlockOutput, decoder_blocks, hidden_from_output, replace_hidden
from refusal_atlas.lm.capture import Activations, capture_activations
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import LAST_INSTRUCTION, post_instruction_positions
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.mechinterp.harm_refusal import NodeGeometry, harm_refusal_geometry
from refusal_atlas.mechinterp.harm_refusal_verdict import RULE_NAME, node_verdict

HARM_WORD, REFUSE_WORD = " gun", " wifi"
NODE = "weapons"
SIGMA = 0.6  # per-coordinate noise: ~4.8 per prompt against planted vectors of norm 6
NORM = 6.0
FILLERS = ("bread", "sea", "poem", "recipe", "capital", "novel", "plot", "water", "salt", "home", "simple",
           "sky", "flour", "yeast", "three", "sentences", "France", "Paris", "summarise", "explain")


def make_prompts(n_per_cell: int, seed: int = 0) -> pd.DataFrame:
    """`n_per_cell` prompts in each of the four cells; the trigger words mark the planted conditions."""
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
                             "harmful": harmful, "refused": refused, "analysis_node": NODE if harmful else ""})
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
        self.handles: list[Any] = []

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

        def plant(module: torch.nn.Module, args: tuple, output: BlockOutput) -> BlockOutput:
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


def planted_vectors(d: int, same: bool, norm: float = NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, R) of norm `norm`: orthogonal, or one vector twice when `same`."""
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(3)))
    h = norm * q[:, 0]
    return h, (h.clone() if same else norm * q[:, 1])


def planted_geometry(lm: LoadedModel, same: bool, n_per_cell: int = 12, *, n_splits: int = 30,
                     n_boot: int = 100) -> tuple[dict[str, NodeGeometry], Planted, pd.DataFrame, Activations]:
    """Capture the planted model's activations and analyse them as the harm stage does."""
    table = make_prompts(n_per_cell)
    planted = Planted(lm, *planted_vectors(lm.d_model, same))
    with planted:
        acts = capture_activations(lm, table["prompt"].tolist(), positions=[LAST_INSTRUCTION, -1], progress=False)
    geom = harm_refusal_geometry(acts, table["analysis_node"].tolist(), table["harmful"].tolist(),
                                 table["refused"].tolist(), n_splits=n_splits, n_boot=n_boot, seed=0)
    return geom, planted, table, acts


def known_answer_checks(lm: LoadedModel | None = None) -> list[dict[str, Any]]:
    """One record per planted answer: {model, question, subject, rule, planted, verdict, agrees}."""
    lm = lm or tiny_model("llama", n_layers=3, d_model=64)
    out = []
    for same, planted in ((False, "separate"), (True, "entangled")):
        geom, _, _, _ = planted_geometry(lm, same)
        g = geom.get(NODE)
        verdict = node_verdict(NODE, g.counts, g.table, [], g.read_layer())["verdict"] if g else "(not measured)"
        out.append({"model": f"planted-2x2-{'equal' if same else 'distinct'}", "question": "harm-vs-refusal",
                    "subject": NODE, "rule": RULE_NAME, "planted": planted, "verdict": verdict,
                    "agrees": verdict == planted})
    return out
