"""Batched greedy/sampled generation with the chat template, left padding and length bucketing.

Shared by response collection, the model organism and the causal tests, so every stage
generates the same way. Interventions are passed as `hooks`: a context manager factory
(e.g. `mechinterp.interventions`) entered around each batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
from tqdm.auto import tqdm
from transformers import GenerationMixin

from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.prefix import SharedPrefix, plan_prefix


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little padding is computed."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def iter_generate(
    lm: LoadedModel,
    instructions: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    system: str | None = None,
    hooks: Callable[[], AbstractContextManager[Any]] | None = None,
    progress: bool = True,
    desc: str = "generate",
    share_prefix: bool = True,
) -> Iterator[tuple[list[int], list[str]]]:
    """Yield (indices, responses) batch by batch, so callers can persist as they go (resumable runs).

    The template's common opening is prefilled once and its keys/values reused by every batch
    (`prefix.py`) unless `share_prefix` is off or `hooks` is not a `per_position` intervention.
    """
    tok = lm.tokenizer
    texts = [lm.chat_prompt(x, system=system) for x in instructions]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    lengths = [len(x) for x in ids]
    share = share_prefix and (hooks is None or getattr(hooks, "per_position", False))
    n_prefix = plan_prefix(ids, lm.model, enabled=share)
    prefix: SharedPrefix | None = None
    batches = length_buckets(lengths, batch_size)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": tok.pad_token_id
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # silence "generation flags are not valid" warnings from model generation configs
        kwargs.update(temperature=None, top_p=None, top_k=None)
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    device = next(lm.model.parameters()).device
    model = cast(GenerationMixin, lm.model)  # every causal LM class mixes it in; PreTrainedModel does not
    enc: dict[str, Any]
    for batch in batches:
        if do_sample:
            torch.manual_seed(seed + batch[0])
        ctx = hooks() if hooks is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            if n_prefix:
                prefix = prefix or SharedPrefix.build(lm.model, ids[batch[0]][:n_prefix])
                enc = prefix.generation_inputs([ids[i][n_prefix:] for i in batch], tok.pad_token_id, device)
            else:
                encoded = tok([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in encoded.items()}
            out = model.generate(**enc, **kwargs)
            assert isinstance(out, torch.Tensor)  # no return_dict_in_generate: the sequences alone
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        responses = tok.batch_decode(new_tokens, skip_special_tokens=True)
        bar.update(len(batch))
        yield batch, [r.strip() for r in responses]
    bar.close()


def generate(lm: LoadedModel, instructions: Sequence[str], **kwargs: Any) -> list[str]:
    """Responses in input order; see `iter_generate` for the options."""
    results: list[str] = [""] * len(instructions)
    for idx, responses in iter_generate(lm, instructions, **kwargs):
        for i, r in zip(idx, responses, strict=True):
            results[i] = r
    return results
