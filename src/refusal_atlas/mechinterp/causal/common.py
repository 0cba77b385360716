"""Helpers every causal step shares: refusal tokens, first-token scores, marker rates, bootstrap CIs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.interventions import Intervention
from refusal_atlas.mechinterp.scoring import (
    RefusalTokens,
    discover_refusal_tokens,
    next_token_logprobs,
    refusal_flags,
    refusal_logodds,
)

__all__ = [
    "TokenSpec",
    "baseline_scores",
    "bootstrap_ci",
    "discover_tokens",
    "first_token_scores",
    "given_tokens",
    "marker_flags",
    "token_ids",
]

TokenSpec = RefusalTokens | Sequence[int]


def token_ids(tokens: TokenSpec) -> list[int]:
    """The refusal-opening token ids of discovered tokens or of a plain id list."""
    return list(tokens.ids) if isinstance(tokens, RefusalTokens) else list(tokens)


def given_tokens(lm: LoadedModel, ids: Sequence[int], given: Sequence[str] | None = None) -> RefusalTokens:
    """RefusalTokens for ids chosen by the user (or a test) instead of discovered from generations."""
    ids = list(ids)
    extra: dict[str, object] = {"given": list(given)} if given is not None else {}
    return RefusalTokens(ids, [str(lm.tokenizer.decode([i])) for i in ids], [], [], float("nan"), 0, 0, extra)


def discover_tokens(
    lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], *, max_new_tokens: int = 12,
    system: str | None = None, progress: bool = False,
) -> tuple[RefusalTokens, np.ndarray, np.ndarray]:
    """Generate on harmful + harmless prompts, detect refusals, discover the refusal openers.

    Returns (tokens, refused flags of the harmful prompts `[n_harmful]`, of the harmless prompts `[n_harmless]`).
    """
    prompts = list(harmful) + list(harmless)
    responses = generate(lm, prompts, max_new_tokens=max_new_tokens, system=system, progress=progress,
                         desc="refusal tokens")
    refused, _ = refusal_flags(responses, prompts)
    tokens = discover_refusal_tokens(lm, prompts, responses, refused.tolist(), system=system)
    return tokens, refused[: len(harmful)], refused[len(harmful):]


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (NaN for fewer than two values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def first_token_scores(lm: LoadedModel, prompts: Sequence[str], ids: TokenSpec,
                       intervention: Intervention | None = None, batch_size: int = 16, system: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(refusal log-odds `[n]`, does the greedy first token open a refusal `[n]`): one forward pass, no generation."""
    logp = next_token_logprobs(lm, prompts, intervention=intervention, batch_size=batch_size, system=system)
    wanted = token_ids(ids)
    odds = refusal_logodds(logp, wanted)
    first = np.isin(logp.argmax(-1).numpy(), np.asarray(wanted))
    return odds, first


def baseline_scores(lm: LoadedModel, prompts: Sequence[str], ids: TokenSpec, settings: RunSettings
                    ) -> tuple[float, float, list[float]]:
    """(first-token refusal rate, mean refusal log-odds, per-prompt log-odds) with nothing changed: the baseline
    every scan compares against."""
    odds, first = first_token_scores(lm, prompts, ids, None, settings.batch_size, settings.system)
    return float(np.mean(first)), float(np.mean(odds)), odds.tolist()


def marker_flags(lm: LoadedModel, prompts: Sequence[str], intervention: Intervention | None,
                 settings: RunSettings) -> np.ndarray:
    """Refused or not `[n]`: the marker detector on `settings.max_new_tokens` generated tokens."""
    responses = generate(lm, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                         system=settings.system, hooks=intervention, progress=False)
    return refusal_flags(responses, prompts)[0]
