"""Logit lens: the final norm is found on every architecture and a token's unembedding promotes it."""

from __future__ import annotations

import pytest

from refusal_atlas.lm.testing import ARCHITECTURES, tiny_model
from refusal_atlas.mechinterp.logit_lens import (
    direction_logits,
    final_norm,
    promoted_tokens,
    token_set_score,
    wording_tokens,
)

NORM_NAMES = {"llama": "model.norm", "gemma2": "model.norm", "qwen2": "model.norm", "gpt2": "transformer.ln_f",
              "gpt_neox": "gpt_neox.final_layer_norm"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_final_norm_and_unembedding_direction(arch):
    lm = tiny_model(arch)
    norm = final_norm(lm.model)
    names = {id(m): n for n, m in lm.model.named_modules()}
    assert names[id(norm)] == NORM_NAMES[arch]
    token = lm.tokenizer("bread", add_special_tokens=False)["input_ids"][0]
    direction = lm.model.get_output_embeddings().weight[token].detach().clone()
    table = promoted_tokens(lm, direction, k=5)
    promoted = table[table["sign"] == "promoted"]
    assert int(promoted.iloc[0]["token_id"]) == token
    assert len(table[table["sign"] == "suppressed"]) == 5
    assert token_set_score(lm, direction, [token]) > 3.0
    assert token_set_score(lm, -direction, [token]) < 0
    logits = direction_logits(lm, direction)
    assert logits.shape[0] == lm.model.get_output_embeddings().weight.shape[0]


def test_wording_tokens_drop_the_shared_part():
    lm = tiny_model("llama")
    shared = "I cannot help with that request."
    own = wording_tokens(lm, "I cannot help with that request. I don't assist with bombs.", shared)
    shared_ids = set(lm.tokenizer(shared, add_special_tokens=False)["input_ids"])
    assert own and not (set(own) & shared_ids)
