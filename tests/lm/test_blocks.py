"""Architecture-agnostic decoder blocks and block-output handling."""

from __future__ import annotations

import pytest
import torch

from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output, replace_hidden
from refusal_atlas.lm.testing import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoder_blocks_found_for_every_architecture(arch):
    lm = tiny_model(arch, n_layers=3)
    blocks = decoder_blocks(lm.model)
    assert len(blocks) == 3 == lm.n_layers
    # the blocks are the ones whose outputs HF reports as hidden_states[1:]
    seen = []
    handle = blocks[1].register_forward_hook(lambda m, a, o: seen.append(hidden_from_output(o).clone()))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    handle.remove()
    assert torch.allclose(seen[0], hs[2], atol=1e-6)


def test_hidden_from_and_replace_keep_container_type():
    h, extra = torch.zeros(1, 2, 3), torch.ones(1)
    assert hidden_from_output(h) is h
    assert hidden_from_output((h, extra)) is h
    new = torch.full((1, 2, 3), 2.0)
    assert replace_hidden(h, new) is new
    out = replace_hidden((h, extra), new)
    assert isinstance(out, tuple) and out[0] is new and out[1] is extra
    out = replace_hidden([h, extra], new)
    assert isinstance(out, list) and out[0] is new
