"""Shared-prefix reuse: compute the chat template's common opening once per call, not once per prompt.

Why: every formatted prompt starts with the same tokens (a template's default system prompt and role
header are often a third or more of a short prompt). Their keys and values do not depend on what
follows (causal attention), so one forward pass over the prefix gives a KV cache that every batch
reuses; each batch then runs only its own tokens, laid out as [prefix | left pads | prompt] with the
pads masked and position ids counted on from the prefix. The result equals the full forward pass up
to float rounding (tests compare against one-prompt-at-a-time `output_hidden_states`).

Exact only for interventions that treat every position alike (ablation, activation addition):
hooks run over the prefix once and over each batch's own tokens afterwards. An intervention marked
`per_position=False` disables the reuse.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

MIN_PREFIX_TOKENS = 4  # below this the extra forward pass costs more than it saves


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


def cache_argument(model: nn.Module) -> str | None:
    """The forward argument that takes a KV cache (`cache` in transformers >= 5.2, `past_key_values`
    before), or None when the model takes no cache or no explicit position ids."""
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    if not {"position_ids", "attention_mask"} <= params:
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@dataclass
class SharedPrefix:
    """The KV cache of `ids` (batch 1), expanded to each batch on demand.

    `cache` holds per layer keys and values of shape [1, n_kv_heads, len(ids), head_dim].
    """

    ids: list[int]
    cache: DynamicCache
    argument: str = "past_key_values"  # the forward argument that takes it

    @property
    def length(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, model: nn.Module, ids: Sequence[int], stop: type[BaseException] | None = None) -> SharedPrefix:
        """Run the prefix once; `stop` is an exception a hook raises to cut the pass short (capture)."""
        cache = DynamicCache(config=getattr(model, "config", None))
        device = next(model.parameters()).device
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        mask = torch.ones_like(input_ids)
        pos = torch.arange(len(ids), device=device).unsqueeze(0)
        suppress = contextlib.suppress(stop) if stop is not None else contextlib.nullcontext()
        arg = cache_argument(model) or "past_key_values"
        with suppress:
            model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **{arg: cache},
                  **last_logit_only(model))
        return cls(list(ids), cache, arg)

    def batch_inputs(self, suffixes: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
                     ) -> dict[str, Any]:
        """Model inputs for a batch of prompt tails: left-padded `input_ids` [batch, width], the full-length
        `attention_mask` [batch, prefix + width], `position_ids` [batch, width] and a cache copy."""
        width = max(len(s) for s in suffixes)
        b, p = len(suffixes), self.length
        input_ids = torch.full((b, width), pad_id, dtype=torch.long)
        mask = torch.zeros((b, p + width), dtype=torch.long)
        mask[:, :p] = 1
        for row, seq in enumerate(suffixes):
            input_ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, p + width - len(seq):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
        cache = copy.deepcopy(self.cache)
        if b > 1:
            cache.batch_repeat_interleave(b)
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                "position_ids": position_ids.to(device), self.argument: cache, "use_cache": True}

    def generation_inputs(self, suffixes: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
                          ) -> dict[str, Any]:
        """`generate` inputs: the whole [prefix | pads | tail] ids (generate skips what the cache holds),
        the mask (generate derives position ids from it) and a cache copy."""
        enc = self.batch_inputs(suffixes, pad_id, device)
        prefix_ids = torch.tensor([self.ids], dtype=torch.long, device=device).expand(len(suffixes), -1)
        return {"input_ids": torch.cat([prefix_ids, enc["input_ids"]], dim=1), "attention_mask": enc["attention_mask"],
                self.argument: enc[self.argument]}


def _sliding_window(model: nn.Module) -> int | None:
    config: Any = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def last_logit_only(model: nn.Module) -> dict[str, int]:
    """Ask for no LM-head output on the prefix pass where the model allows it (logits are not needed)."""
    try:
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            return {"logits_to_keep": 1}
    except (TypeError, ValueError):
        pass
    return {}


def plan_prefix(seqs: Sequence[Sequence[int]], model: nn.Module, *, keep_last: int = 1,
                max_length: int | None = None, enabled: bool = True) -> int:
    """How many leading tokens to share: the common prefix, leaving `keep_last` tokens of every prompt
    to run per batch and never past `max_length` (e.g. the first instruction token); 0 = no reuse."""
    if not enabled or len(seqs) < 2 or cache_argument(model) is None:
        return 0
    window = _sliding_window(model)
    if window is not None and max(len(s) for s in seqs) >= window:
        # pads between prefix and tail lengthen query-key distances: a window would cut differently
        return 0
    n = common_prefix_length(seqs)
    n = min(n, min(len(s) for s in seqs) - keep_last)
    if max_length is not None:
        n = min(n, max_length)
    return n if n >= MIN_PREFIX_TOKENS else 0

