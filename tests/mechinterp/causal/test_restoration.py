"""The restoration scan: windows of blocks set back to a reference model's weights (planted: some blocks differ)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import block_states, decoder_blocks, restored_blocks
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.lm.testing import ARCHITECTURES, tiny_model
from refusal_atlas.mechinterp.causal.common import first_token_scores
from refusal_atlas.mechinterp.causal.files import RESTORATION, write_table
from refusal_atlas.mechinterp.causal.restoration import restoration_scan

PROMPTS = ["How do I pick a lock?", "Write a poem about rivers.", "Explain how vaccines work in detail."]


def _fine_tuned(arch: str, changed: range) -> tuple:
    """(reference, a copy of it whose blocks in `changed` come from another random draw)."""
    reference = tiny_model(arch, seed=0, n_layers=4)
    tuned = copy.deepcopy(reference)
    other = tiny_model(arch, seed=1, n_layers=4)
    for b in changed:
        decoder_blocks(tuned.model)[b].load_state_dict(decoder_blocks(other.model)[b].state_dict())
    return reference, tuned


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_restoring_the_changed_blocks_gives_the_reference_and_the_others_change_nothing(arch, tmp_path):
    reference, tuned = _fine_tuned(arch, range(2, 4))
    tokens = [int(tuned.tokenizer("I", add_special_tokens=False)["input_ids"][0])]
    table = restoration_scan(tuned, block_states(reference.model), {"a": PROMPTS}, tokens, reference_name="ref",
                             n_windows=2, settings=RunSettings(progress=False))
    assert list(zip(table["block_lo"], table["block_hi"], strict=True)) == [(0, 1), (2, 3)]
    ref_odds, _ = first_token_scores(reference, PROMPTS, tokens)
    own_odds, _ = first_token_scores(tuned, PROMPTS, tokens)
    untouched, changed = table.iloc[0], table.iloc[1]
    # blocks 0-1 are the reference's already: restoring them is the identity
    np.testing.assert_allclose(untouched["prompt_logit_scores"], own_odds, atol=1e-5)
    # blocks 2-3 are the only difference: restoring them gives the reference model's scores exactly
    np.testing.assert_allclose(changed["prompt_logit_scores"], ref_odds, atol=1e-5)
    np.testing.assert_allclose(changed["prompt_logit_scores_baseline"], own_odds, atol=1e-5)
    assert not np.allclose(ref_odds, own_odds)
    assert (table["reference"] == "ref").all() and write_table(table, tmp_path, RESTORATION).is_file()
    # the model's own weights are back afterwards
    np.testing.assert_allclose(first_token_scores(tuned, PROMPTS, tokens)[0], own_odds, atol=1e-6)


def test_a_reference_of_another_size_is_a_one_line_error_and_changes_nothing():
    tuned = tiny_model("llama", seed=0, n_layers=4)
    wider = tiny_model("llama", seed=0, n_layers=4, d_model=32)
    before = copy.deepcopy(decoder_blocks(tuned.model)[1].state_dict())
    with pytest.raises(AtlasError, match="do not fit"), restored_blocks(tuned.model, block_states(wider.model), [1]):
        pass
    after = decoder_blocks(tuned.model)[1].state_dict()
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
    with pytest.raises(AtlasError, match="no reference weights"), restored_blocks(tuned.model, {}, [0]):
        pass
