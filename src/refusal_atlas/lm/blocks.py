"""Architecture-agnostic access to the residual stream of every decoder block.

We never assume `model.model.layers`: the decoder blocks are the `nn.ModuleList` whose length
equals the config's layer count (Llama/Gemma/Qwen `model.layers`, GPT-2 `transformer.h`,
GPT-NeoX `gpt_neox.layers`, ...). The residual stream "at layer l" is the output of block l
(hidden_states[l + 1] in HF's `output_hidden_states` numbering).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import Tensor, nn

from refusal_atlas.errors import AtlasError

# A block's output: the hidden state [batch, seq, d_model] alone (transformers 5) or first in a tuple/list.
BlockOutput = TypeVar("BlockOutput", Tensor, tuple[Any, ...], list[Any])

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def n_layers_from_config(config: Any) -> int | None:
    """The decoder layer count a (possibly multimodal) config declares, under whichever name it uses."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _LAYER_COUNT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int):
            return value
    return None


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    cached = getattr(model, "_refusal_atlas_blocks", None)
    if cached is not None:
        return cached
    expected = n_layers_from_config(model.config) if hasattr(model, "config") else None
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if expected is not None:
        exact = [(n, m) for n, m in candidates if len(m) == expected]
        if exact:
            candidates = exact
    if not candidates:
        raise ValueError(f"could not find the decoder blocks of {type(model).__name__}")
    # Prefer the shortest module path (the main stack, not a nested list inside a block).
    _name, blocks = min(candidates, key=lambda nm: (nm[0].count("."), -len(nm[1])))
    object.__setattr__(model, "_refusal_atlas_blocks", blocks)
    return blocks


def hidden_from_output(output: Tensor | tuple[Any, ...] | list[Any]) -> Tensor:
    """A block's output is a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple | list) else output


def replace_hidden(output: BlockOutput, hidden: Tensor) -> BlockOutput:
    """Return `output` with its hidden state replaced, keeping the original container type."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def block_states(model: nn.Module, blocks: Iterable[int] | None = None) -> dict[int, dict[str, Tensor]]:
    """Copies of the decoder blocks' weights (all blocks by default), to restore another model's blocks to."""
    mods = decoder_blocks(model)
    chosen = range(len(mods)) if blocks is None else blocks
    return {int(i): copy.deepcopy(mods[int(i)].state_dict()) for i in chosen}


@contextmanager
def restored_blocks(model: nn.Module, states: Mapping[int, Mapping[str, Tensor]], blocks: Iterable[int]
                    ) -> Iterator[None]:
    """Decoder `blocks` set to the weights in `states` (e.g. the model a fine-tune started from) for the
    duration, the model's own afterwards, even on error. A block whose weights do not fit (another
    architecture or size) is a one-line error before anything changes."""
    mods = decoder_blocks(model)
    chosen = sorted({int(b) for b in blocks})
    missing = [b for b in chosen if b not in states or not 0 <= b < len(mods)]
    if missing:
        raise AtlasError(f"block(s) {missing}: no reference weights or out of range (the model has {len(mods)} "
                         f"decoder blocks); the reference must be the same architecture and size")
    for b in chosen:
        own = mods[b].state_dict()
        ref = states[b]
        if set(ref) != set(own) or any(tuple(ref[k].shape) != tuple(own[k].shape) for k in own):
            raise AtlasError(f"block {b}: the reference model's weights do not fit this model's (another "
                             f"architecture or size); give the model this one was fine-tuned from")
    kept = {b: copy.deepcopy(mods[b].state_dict()) for b in chosen}
    try:
        for b in chosen:
            mods[b].load_state_dict(states[b])
        yield
    finally:
        for b, state in kept.items():
            mods[b].load_state_dict(state)
