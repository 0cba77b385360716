"""Refusal scores for causal tests, and the capability cost of an intervention.

Three measurements:
- the marker detector on generations (`refusal_flags`, from `curation.detect`): did it refuse?
- a logit score at the first generated position (`logit_refusal_score`): log-odds that the reply
  starts with a refusal-opening token. The token set is *discovered* from the model's own refusals
  (`discover_refusal_tokens`: first tokens enriched among replies the detector calls refusals
  against compliant ones), never hard-coded per model, so it works for any tokenizer and wording;
- KL divergence between the clean and intervened next-token distributions on harmless prompts
  (`kl_divergence`): what the intervention costs where it should change nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from refusal_atlas.curation.detect import get_detector
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import accepts_position_ids, left_pad
from refusal_atlas.lm.generation import generate, length_buckets
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.prefix import SharedPrefix, plan_prefix
from refusal_atlas.mechinterp.interventions import Intervention, maybe

# --------------------------------------------------------------------------------------------
# Generation-based: the marker detector
# --------------------------------------------------------------------------------------------


def refusal_flags(
    responses: Sequence[str], prompts: Sequence[str] | None = None, detector: str = "marker"
) -> tuple[np.ndarray, np.ndarray]:
    """(refused bool array, score array) from the curation area's detector (default: markers)."""
    det = get_detector(detector)
    refused, scores = det.predict(list(responses), list(prompts) if prompts is not None else [""] * len(responses))
    return np.asarray(refused, dtype=bool), np.asarray(scores, dtype=float)


# --------------------------------------------------------------------------------------------
# Forward passes: next-token log-probabilities at the first generated position
# --------------------------------------------------------------------------------------------


def _forward_last(lm: LoadedModel, enc: dict) -> torch.Tensor:
    try:
        out = lm.model(**enc, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        out = lm.model(**enc)
    return out.logits[:, -1, :].float()


def next_token_logprobs(
    lm: LoadedModel,
    instructions: Sequence[str],
    *,
    intervention: Intervention | None = None,
    batch_size: int = 16,
    system: str | None = None,
    suffixes: Sequence[str] | None = None,
    progress: bool = False,
    desc: str = "forward",
    share_prefix: bool = True,
) -> torch.Tensor:
    """log-softmax of the next token after the chat prompt (plus an optional per-prompt suffix), [n, V].

    Batched with left padding and length bucketing; the intervention's hooks are active throughout.
    The template's common opening is run once and its keys/values reused (`prefix.py`) unless
    `share_prefix` is off or the intervention is not `per_position`.
    """
    tok = lm.tokenizer
    texts = [lm.chat_prompt(x, system=system) for x in instructions]
    if suffixes is not None:
        texts = [t + s for t, s in zip(texts, suffixes, strict=True)]
    if not texts:
        return torch.zeros(0, lm.model.get_output_embeddings().weight.shape[0])
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    lengths = [len(x) for x in ids]
    device = next(lm.model.parameters()).device
    share = share_prefix and (intervention is None or intervention.per_position)
    n_prefix = plan_prefix(ids, lm.model, enabled=share)
    result: list[torch.Tensor | None] = [None] * len(texts)
    bar = tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), maybe(intervention):
        prefix = SharedPrefix.build(lm.model, ids[0][:n_prefix]) if n_prefix else None
        for batch in length_buckets(lengths, batch_size):
            if prefix is not None:
                enc = prefix.batch_inputs([ids[i][n_prefix:] for i in batch], tok.pad_token_id, device)
            else:
                enc = left_pad([ids[i] for i in batch], tok.pad_token_id)
                if not accepts_position_ids(lm.model):
                    enc.pop("position_ids")
                enc = {k: v.to(device) for k, v in enc.items()}
                enc["use_cache"] = False
            logp = torch.log_softmax(_forward_last(lm, enc), dim=-1).cpu()
            for j, i in enumerate(batch):
                result[i] = logp[j]
            bar.update(len(batch))
    bar.close()
    return torch.stack(result)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Discovering the refusal-opening tokens
# --------------------------------------------------------------------------------------------


@dataclass
class RefusalTokens:
    """The first tokens that open this model's refusals (ids, their text, and the evidence)."""

    ids: list[int]
    tokens: list[str]
    refusal_share: list[float]  # share of refusals opening with each token
    comply_share: list[float]  # share of compliant replies opening with it
    coverage: float  # share of refusals opening with any selected token
    n_refusals: int
    n_compliant: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RefusalTokens:
        return cls(**data)


def first_response_tokens(
    lm: LoadedModel, instructions: Sequence[str], responses: Sequence[str], system: str | None = None
) -> list[int | None]:
    """The id of each response's first token *as the model would generate it* after the chat prompt."""
    tok = lm.tokenizer
    out: list[int | None] = []
    for instruction, response in zip(instructions, responses, strict=True):
        if not response:
            out.append(None)
            continue
        prompt = lm.chat_prompt(instruction, system=system)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + response, add_special_tokens=False)["input_ids"]
        out.append(int(full[len(p_ids)]) if len(full) > len(p_ids) and full[: len(p_ids)] == p_ids else
                   int(tok(response, add_special_tokens=False)["input_ids"][0]))
    return out


def discover_refusal_tokens(
    lm: LoadedModel,
    instructions: Sequence[str],
    responses: Sequence[str],
    refused: Sequence[bool],
    *,
    min_count: int = 2,
    max_tokens: int = 8,
    target_coverage: float = 0.95,
    system: str | None = None,
) -> RefusalTokens:
    """First tokens over-represented among refusals relative to compliant replies.

    A token qualifies when it opens at least `min_count` refusals and its share among refusals is
    at least twice (and 5 points above) its share among compliant replies; the most enriched are
    taken until `target_coverage` of refusals is covered or `max_tokens` are chosen.
    """
    firsts = first_response_tokens(lm, instructions, responses, system=system)
    ref = Counter(t for t, r in zip(firsts, refused, strict=True) if r and t is not None)
    com = Counter(t for t, r in zip(firsts, refused, strict=True) if not r and t is not None)
    n_ref, n_com = sum(ref.values()), sum(com.values())
    if n_ref == 0:
        raise AtlasError(
            "cannot discover refusal-opening tokens: the model refused none of the prompts given; "
            "use a model that refuses (e.g. `refusal-atlas organism build`) or more harmful prompts"
        )
    candidates = []
    for t, c in ref.items():
        p_r = c / n_ref
        p_c = com.get(t, 0) / n_com if n_com else 0.0
        if c >= min(min_count, n_ref) and p_r >= 2 * p_c and p_r - p_c >= 0.05:
            candidates.append((p_r - p_c, p_r, p_c, t))
    candidates.sort(reverse=True)
    chosen: list[tuple[float, float, float, int]] = []
    covered = 0.0
    for cand in candidates[:max_tokens]:
        chosen.append(cand)
        covered += cand[1]
        if covered >= target_coverage:
            break
    if not chosen:
        raise AtlasError(
            "cannot discover refusal-opening tokens: refusals and compliant replies open with the same "
            "tokens; score refusals with the marker detector instead"
        )
    ids = [c[3] for c in chosen]
    return RefusalTokens(
        ids=ids,
        tokens=[cast(str, lm.tokenizer.decode([i])) for i in ids],  # decode of one id list is a str
        refusal_share=[c[1] for c in chosen],
        comply_share=[c[2] for c in chosen],
        coverage=float(sum(c[1] for c in chosen)),
        n_refusals=n_ref,
        n_compliant=n_com,
    )


# --------------------------------------------------------------------------------------------
# Logit score and KL
# --------------------------------------------------------------------------------------------


def refusal_logodds(logprobs: torch.Tensor, token_ids: Sequence[int]) -> np.ndarray:
    """log P(refusal token) − log(1 − P(refusal token)) per row, P summed over the token set."""
    idx = torch.as_tensor(list(token_ids), dtype=torch.long)
    lp = torch.logsumexp(logprobs[:, idx], dim=-1).double()
    # log(1 - p) computed stably from log p
    log1m = torch.where(lp > -0.693, torch.log(-torch.expm1(lp)), torch.log1p(-torch.exp(lp)))
    return (lp - log1m).clamp(-50, 50).numpy()


def logit_refusal_score(
    lm: LoadedModel,
    instructions: Sequence[str],
    tokens: RefusalTokens | Sequence[int],
    *,
    intervention: Intervention | None = None,
    batch_size: int = 16,
    system: str | None = None,
) -> np.ndarray:
    """Per-prompt refusal log-odds at the first generated position (higher = more likely to refuse)."""
    ids = tokens.ids if isinstance(tokens, RefusalTokens) else list(tokens)
    logp = next_token_logprobs(lm, instructions, intervention=intervention, batch_size=batch_size, system=system)
    return refusal_logodds(logp, ids)


def kl_from_logprobs(clean: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """KL(clean ‖ other) per row, in nats."""
    return (clean.exp() * (clean - other)).sum(-1).clamp_min(0).double().numpy()


def kl_divergence(
    lm: LoadedModel,
    instructions: Sequence[str],
    intervention: Intervention | None,
    *,
    n_positions: int = 1,
    batch_size: int = 16,
    system: str | None = None,
    clean: list[torch.Tensor] | None = None,
) -> np.ndarray:
    """Mean KL(clean ‖ intervened) per prompt over the first `n_positions` generated positions.

    Positions after the first are scored teacher-forced on the clean model's greedy continuation,
    so both models see the same context. Zero when `intervention` is None.
    """
    suffixes = [""] * len(instructions)
    total = np.zeros(len(instructions))
    for pos in range(n_positions):
        ref = clean[pos] if clean is not None and pos < len(clean) else next_token_logprobs(
            lm, instructions, batch_size=batch_size, system=system, suffixes=suffixes
        )
        if intervention is not None:
            alt = next_token_logprobs(
                lm, instructions, intervention=intervention, batch_size=batch_size, system=system, suffixes=suffixes
            )
            total += kl_from_logprobs(ref, alt)
        if pos + 1 < n_positions:
            nxt = ref.argmax(-1).tolist()
            suffixes = [s + cast(str, lm.tokenizer.decode([t])) for s, t in zip(suffixes, nxt, strict=True)]
    return total / max(n_positions, 1)


def clean_logprobs(
    lm: LoadedModel,
    instructions: Sequence[str],
    *,
    n_positions: int = 1,
    batch_size: int = 16,
    system: str | None = None,
) -> list[torch.Tensor]:
    """The clean model's log-probs at the first `n_positions` positions (reuse across many KL calls)."""
    suffixes = [""] * len(instructions)
    out = []
    for pos in range(n_positions):
        ref = next_token_logprobs(lm, instructions, batch_size=batch_size, system=system, suffixes=suffixes)
        out.append(ref)
        if pos + 1 < n_positions:
            nxt = ref.argmax(-1).tolist()
            suffixes = [s + cast(str, lm.tokenizer.decode([t])) for s, t in zip(suffixes, nxt, strict=True)]
    return out


def answered_mean(values: Tensor | np.ndarray, refused: Sequence[bool] | np.ndarray) -> float:
    """Mean of per-prompt `values` over the prompts not `refused` (over all of them when every one is).

    Why: a harmless-prompt KL is a capability cost only where the model answered; where it refused a
    harmless prompt, an intervention that removes refusal is meant to change the output.
    """
    v = np.asarray(values, dtype=float)
    keep = ~np.asarray(refused, dtype=bool)
    return float(v[keep].mean() if keep.any() else v.mean())


def behaves_as_labelled(
    lm: LoadedModel,
    prompts: Sequence[str],
    harmful: Sequence[bool],
    *,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, refused): which prompts the model treats as labelled — harmful ones refused, harmless ones
    answered (marker detector on greedy generations) — and the refusal flags themselves.

    Why: Arditi et al. compute the refusal direction from prompts filtered by baseline behaviour, so the
    difference of means contrasts refusing with answering, not two topic sets that partly overlap in
    what the model does.
    """
    if not len(prompts):
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    replies = generate(lm, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size, system=system,
                       progress=progress, desc="baseline behaviour")
    refused = refusal_flags(replies, list(prompts))[0]
    return refused == np.asarray(harmful, dtype=bool), refused


def behaviour_mask(behaves: Sequence[bool], groups: Sequence[str], min_keep: int) -> tuple[np.ndarray, list[str]]:
    """(rows to keep, groups kept whole): the rows that behave as labelled, except in a group where fewer
    than `min_keep` (or all its rows, if fewer) do — a branch the model never refuses keeps its prompts,
    so its direction contrasts topics rather than behaviour, and is named rather than dropped."""
    b = np.asarray(behaves, dtype=bool)
    g = np.asarray(list(groups), dtype=object)
    keep, whole = b.copy(), []
    for name in sorted(set(g.tolist())):
        rows = g == name
        if b[rows].sum() < min(min_keep, rows.sum()):
            keep[rows] = True
            whole.append(str(name))
    return keep, whole
