"""The fine-tune: response-only loss with weighted decision tokens, frozen lower blocks, shared prefix."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.prefix import cache_argument, last_logit_only, plan_prefix
from refusal_atlas.organism.settings import NODE_REFUSAL, SHARED_REFUSAL, OrganismSettings


def _wording_lead(lm: LoadedModel) -> list[int]:
    """The tokens the shared and the node-specific refusal wordings both open with."""
    tok = lm.tokenizer
    shared = tok(SHARED_REFUSAL, add_special_tokens=False)["input_ids"]
    node = tok(NODE_REFUSAL.format(label="x"), add_special_tokens=False)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(shared, node, strict=False)) if a != b), min(len(shared), len(node)))
    return list(shared[:n])


def _wording_marks(labels: Sequence[int], lead: Sequence[int], eos: int | None) -> list[int]:
    """Positions of a refusal's wording choice: every response token after the wordings' common `lead`
    (which wording, which label), none where the response does not open with it."""
    first = next((i for i, y in enumerate(labels) if y != -100), len(labels))
    if not lead or list(labels[first : first + len(lead)]) != list(lead):
        return []
    return [i for i in range(first + len(lead), len(labels)) if labels[i] != eos]


def _encode(lm: LoadedModel, prompt: str, target: str, complete: bool, system: str | None,
            opener: str = "") -> tuple[list, list, list]:
    """(input ids, labels, decision positions): the response's first token, and where the target opens
    with `opener`, also the first token after it (answer, or a refusal after all?)."""
    tok = lm.tokenizer
    p_ids = tok(lm.chat_prompt(prompt, system=system), add_special_tokens=False)["input_ids"]
    t_ids = tok(target, add_special_tokens=False)["input_ids"]
    if complete and tok.eos_token_id is not None:
        t_ids = [*t_ids, tok.eos_token_id]
    decisions = [len(p_ids)]
    if opener and target.startswith(opener):
        o_ids = tok(opener.rstrip(), add_special_tokens=False)["input_ids"]
        k = len(o_ids) if t_ids[: len(o_ids)] == o_ids else len(t_ids)
        while k < len(t_ids) and not str(tok.decode(t_ids[k : k + 1])).strip():  # the body's first word, not a space
            k += 1
        if k < len(t_ids):
            decisions.append(len(p_ids) + k)
    return p_ids + t_ids, [-100] * len(p_ids) + t_ids, decisions


def _response_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, first: int,
                   decision_weight: float = 1.0, prefix: Sequence[int] | None = None,
                   decisions: torch.Tensor | None = None, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean next-token cross-entropy over response tokens, logits computed only from `first - 1` on.

    Why: the prompt is most of each sequence and its logits (49k-way for the default model) are
    never scored; `logits_to_keep` skips computing them.
    `decision_weight` multiplies the loss of each response's first token — the token where the
    model decides between refusing and answering; the rest of a refusal is near-deterministic.
    `decisions` (bool, the shape of `labels`) marks the weighted tokens instead, e.g. also the first
    token after a permitted answer's opener, where "Sure. I'm sorry, but…" would refuse after all.
    `token_weights` (float, the shape of `labels`) gives every token its own weight instead of both.
    `prefix`: token ids every row of the (right-padded) batch starts with; they are run once at
    batch size 1 and their keys/values (gradients flowing) reused by every row — a third of the
    tokens of a default training row are the chat template's system prompt.
    """
    keep = ids.shape[1] - first + 1
    kwargs: dict = {"use_cache": False}
    if prefix:


        p = len(prefix)
        cache, arg = DynamicCache(config=model.config), cache_argument(model)
        head = ids[:1, :p]
        if arg is None:  # `_training_prefix` plans no shared prefix for a model that takes no cache
            raise AtlasError("shared-prefix training needs a model whose forward takes a KV cache")
        head_kwargs: dict[str, Any] = {arg: cache, **last_logit_only(model)}
        model(input_ids=head, attention_mask=mask[:1, :p], position_ids=torch.arange(p, device=ids.device)[None],
              use_cache=True, **head_kwargs)
        if ids.shape[0] > 1:
            cache.batch_repeat_interleave(ids.shape[0])
        pos = torch.arange(p, ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        kwargs = {"use_cache": True, arg: cache, "position_ids": pos}
        ids_in, mask_in = ids[:, p:], mask
    else:
        ids_in, mask_in = ids, mask
    try:
        logits = model(input_ids=ids_in, attention_mask=mask_in, logits_to_keep=keep, **kwargs).logits
    except TypeError:  # an architecture without logits_to_keep: full logits, same loss
        logits = model(input_ids=ids_in, attention_mask=mask_in, **kwargs).logits[:, -keep:]
    targets = labels[:, ids.shape[1] - keep + 1 :]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=-100, reduction="none").view_as(targets)
    scored = (targets != -100).float()
    weights = scored.clone()
    if token_weights is not None:
        weights = token_weights[:, ids.shape[1] - keep + 1 :].float() * scored
    elif decision_weight != 1.0:
        marked = (decisions[:, ids.shape[1] - keep + 1 :] if decisions is not None
                  else scored.cumsum(1).eq(1)) & scored.bool()
        weights = torch.where(marked, torch.full_like(weights, decision_weight), weights)
    return (ce * weights).sum() / weights.sum().clamp_min(1.0)


def _training_prefix(encoded: Sequence[tuple[list, list, list]], model: PreTrainedModel) -> list[int]:
    """The prompt tokens every training row shares (none where the reuse does not apply)."""

    firsts = [next(i for i, y in enumerate(lab) if y != -100) for _, lab, _ in encoded]
    n = plan_prefix([x for x, _, _ in encoded], model, max_length=min(firsts) - 1)
    return list(encoded[0][0][:n]) if n else []


def _trainable(model: PreTrainedModel, frozen_fraction: float,
               band: tuple[int, int] | None = None) -> list[torch.nn.Parameter]:
    """Freeze the input embeddings and the lowest `frozen_fraction` of blocks; return the rest.

    Why: backward then stops at the first trained block (about a quarter less compute per step on
    2 cores), and the organism gets a planted fact to check the toolkit against — its refusal can
    only be *computed* from that block on, while harm detection below it is the base model's own.

    `band=(lo, hi)` instead trains blocks lo..hi-1 only (embeddings, head, final norm and every other
    block frozen): what such a fine-tune plants lives in those blocks' weights and nowhere else, so
    restoring them to the base model's is a check of the planted truth that needs no toolkit.
    """

    blocks = list(decoder_blocks(model))
    if band is not None:
        lo, hi = band
        if not 0 <= lo < hi <= len(blocks):
            raise AtlasError(f"block band {lo}..{hi - 1}: the model has blocks 0..{len(blocks) - 1}")
        for p in model.parameters():
            p.requires_grad_(False)
        for block in blocks[lo:hi]:
            for p in block.parameters():
                p.requires_grad_(True)
        return [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(True)
    if frozen_fraction > 0:
        k = int(len(blocks) * frozen_fraction)
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)
        for block in blocks[:k]:
            for p in block.parameters():
                p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _first_trained_block(model: torch.nn.Module) -> int:
    """Index of the lowest block the fine-tune changed (0 when nothing was frozen)."""

    for i, block in enumerate(decoder_blocks(model)):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return 0


def finetune(lm: LoadedModel, train: pd.DataFrame, settings: OrganismSettings, progress: bool = True,
             band: tuple[int, int] | None = None) -> list[float]:
    """Full fine-tune with AdamW, loss on response tokens only (only blocks `band` when given); returns
    the per-step losses."""
    model = lm.model
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    opener = settings.permitted_opener if settings.weight_answer_start else ""
    encoded = [_encode(lm, r.prompt, r.target, bool(r.target_complete), settings.system, opener)
               for r in train.itertuples()]
    lead = _wording_lead(lm) if settings.wording_token_weight != 1.0 else []
    wording = [_wording_marks(y, lead, lm.tokenizer.eos_token_id) for _, y, _ in encoded]
    pad = lm.tokenizer.pad_token_id
    params = _trainable(model, settings.frozen_layers_fraction, band)
    try:  # the fused kernel: the optimizer step measured 0.31 s -> 0.13 s per step on 2 cores
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    bs = settings.batch_size
    steps_per_epoch = (len(encoded) + bs - 1) // bs
    total = steps_per_epoch * settings.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(settings.warmup_steps, 1)) * max(0.1, 1 - s / max(total, 1)))
    losses: list[float] = []
    device = next(model.parameters()).device
    prefix = _training_prefix(encoded, model) if settings.share_prefix else []
    model.train()
    bar = tqdm(total=total, desc="fine-tune", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for _ in range(settings.epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            # similar lengths together (less padding), batch order shuffled
            chunks = [sorted(order[i : i + bs * 8], key=lambda j: len(encoded[j][0]))
                      for i in range(0, len(order), bs * 8)]
            batches = [c[i : i + bs] for c in chunks for i in range(0, len(c), bs)]
            rng.shuffle(batches)
            for batch in batches:
                width = max(len(encoded[j][0]) for j in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                weights = torch.ones((len(batch), width))
                for k, j in enumerate(batch):
                    x, y, d = encoded[j]
                    ids[k, : len(x)] = torch.tensor(x)
                    labels[k, : len(y)] = torch.tensor(y)
                    mask[k, : len(x)] = 1
                    weights[k, wording[j]] = settings.wording_token_weight
                    weights[k, d] = settings.decision_token_weight
                first = min(next(i for i, y in enumerate(encoded[j][1]) if y != -100) for j in batch)
                loss = _response_loss(model, ids.to(device), mask.to(device), labels.to(device), first,
                                      prefix=prefix, token_weights=weights.to(device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    finally:
        bar.close()
        model.eval()
    return losses
