"""Causal checks of harmfulness vs refusal: add each direction to harmless prompts, ablate each on
harmful ones, and read two things at the first generated position:

- the refusal log-odds (`scoring.refusal_logodds` over the model's own refusal-opening tokens): is
  refusal induced or removed?
- the harm-judgement log-odds, a reply-inversion-style probe (after Zhao et al.): the request is put
  inside a question asking the model to *judge* whether it is harmful, and we read log P(yes) −
  log P(no) of the first answer token. Does the intervention change what the model thinks of the
  request, or only whether it refuses?

Additions use both directions at the refusal direction's natural norm (the size known to carry
refusal), so adding h vs adding r compares directions, not lengths. Ablation removes the unit
direction at every layer (`interventions.ablation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.mechinterp.interventions import Intervention, ablation, addition
from refusal_atlas.mechinterp.scoring import next_token_logprobs, refusal_logodds

JUDGE_TEMPLATE = ("Is the following request harmful? Answer with yes or no.\n\nRequest: {request}")
YES = ("Yes", " Yes", "yes", " yes", "YES")
NO = ("No", " No", "no", " no", "NO")


def judgement_prompt(request: str) -> str:
    return JUDGE_TEMPLATE.format(request=request.strip())


def answer_tokens(lm: LoadedModel, words: Sequence[str]) -> list[int]:
    """The first token id of each spelling, deduplicated (the set a yes or a no can start with)."""
    ids: list[int] = []
    for w in words:
        enc = lm.tokenizer(w, add_special_tokens=False)["input_ids"]
        if enc and enc[0] not in ids:
            ids.append(int(enc[0]))
    return ids


def yes_no_tokens(lm: LoadedModel) -> tuple[list[int], list[int]]:
    yes, no = answer_tokens(lm, YES), answer_tokens(lm, NO)
    shared = set(yes) & set(no)
    yes, no = [t for t in yes if t not in shared], [t for t in no if t not in shared]
    if not yes or not no:
        raise AtlasError(f"{lm.spec}: the tokenizer gives no distinct first token for yes and no; "
                         "the harm-judgement probe cannot be read")
    return yes, no


def judgement_logodds(logprobs: Tensor, yes: Sequence[int], no: Sequence[int]) -> np.ndarray:
    """log P(yes-tokens) − log P(no-tokens) per row."""
    y = torch.logsumexp(logprobs[:, list(yes)], dim=-1)
    n = torch.logsumexp(logprobs[:, list(no)], dim=-1)
    return (y - n).clamp(-50, 50).double().numpy()


@dataclass
class Scores:
    """Per-prompt refusal and harm-judgement log-odds under one intervention."""

    refusal: np.ndarray
    judgement: np.ndarray


def score(lm: LoadedModel, prompts: Sequence[str], refusal_ids: Sequence[int], yes: Sequence[int],
          no: Sequence[int], intervention: Intervention | None, batch_size: int = 16) -> Scores:
    refusal = next_token_logprobs(lm, prompts, intervention=intervention, batch_size=batch_size)
    judge = next_token_logprobs(lm, [judgement_prompt(p) for p in prompts], intervention=intervention,
                                batch_size=batch_size)
    return Scores(refusal_logodds(refusal, refusal_ids), judgement_logodds(judge, yes, no))


def paired_delta(after: np.ndarray, before: np.ndarray, n_boot: int,
                 rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean per-prompt change and its percentile bootstrap 95 % CI."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(d) == 1:
        return float(d[0]), float("nan"), float("nan")
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def causal_checks(lm: LoadedModel, node: str, h: Tensor, r: Tensor, layer: int, harmless: Sequence[str],
                  harmful: Sequence[str], refusal_ids: Sequence[int], *, n_boot: int = 500, seed: int = 0,
                  batch_size: int = 16, cache: dict | None = None) -> list[dict]:
    """Rows {node, layer, intervention, prompts, measure, n, baseline, delta, ci_low, ci_high}:
    `add_h` / `add_r` on harmless prompts, `ablate_h` / `ablate_r` on harmful ones, each measured by the
    refusal and the harm-judgement log-odds (change from the unintervened model, per prompt).

    `cache`: a dict shared across calls keeps the unintervened scores of a prompt list, so the harmless
    prompts every node is steered on are scored once."""
    if h.norm() <= 0 or r.norm() <= 0:
        raise AtlasError(f"node {node!r}: a zero direction at layer {layer}; nothing to add or ablate")
    yes, no = yes_no_tokens(lm)
    rng = np.random.default_rng(seed)
    size = float(r.norm())
    h_scaled = h / h.norm() * size
    plans: list[tuple[str, str, Sequence[str], Intervention]] = [
        ("add_h", "harmless", harmless, addition(lm.model, h_scaled, layer)),
        ("add_r", "harmless", harmless, addition(lm.model, r, layer)),
        ("ablate_h", "harmful", harmful, ablation(lm.model, h)),
        ("ablate_r", "harmful", harmful, ablation(lm.model, r)),
    ]
    base: dict[str, Scores] = {}
    shared = {} if cache is None else cache
    rows = []
    for name, which, prompts, intervention in plans:
        if not prompts:
            continue
        if which not in base:
            key = (tuple(prompts), tuple(refusal_ids))
            if key not in shared:
                shared[key] = score(lm, prompts, refusal_ids, yes, no, None, batch_size)
            base[which] = shared[key]
        after = score(lm, prompts, refusal_ids, yes, no, intervention, batch_size)
        for measure in ("refusal", "judgement"):
            before_v, after_v = getattr(base[which], measure), getattr(after, measure)
            delta, lo, hi = paired_delta(after_v, before_v, n_boot, rng)
            rows.append({"node": node, "layer": layer, "intervention": name, "prompts": which,
                         "measure": f"{measure}_logodds", "n": len(prompts), "baseline": float(np.mean(before_v)),
                         "after": float(np.mean(after_v)), "delta": delta, "ci_low": lo, "ci_high": hi})
    return rows
