"""The separable organism: two branches whose refusals live in disjoint bands of blocks.

Why: the shared organism has one refusal decision for every branch, so it can only show that the
toolkit says "one shared component" when there is one. Here branch A's refusal is fine-tuned into
a middle band of blocks only (everything else frozen), then branch B's into an upper band only,
while A's targets stay in the training set so A keeps refusing. The other harmful branches and
harmless prompts are trained on the base model's own answers, so neither fine-tune can become a
generic "refuse anything harmful" switch that the other branch would inherit.

The planted truth is checked without the toolkit: restoring band A's weights to the base model's
must remove A's refusal and keep B's, and restoring band B's the reverse. The rates, with their n,
go into organism.json under `truth`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write_json
from refusal_atlas.lm.blocks import block_states, decoder_blocks, restored_blocks
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.organism.build import (
    _base_identity,
    cache_key,
    save_model,
    start_build,
    write_parquet,
)
from refusal_atlas.organism.evaluation import evaluate
from refusal_atlas.organism.policy import _pid, _refusing, _stable, behaviour_of
from refusal_atlas.organism.rows import prompt_pool
from refusal_atlas.organism.settings import ORGANISM_JSON, OrganismResult, OrganismSettings
from refusal_atlas.organism.targets import _truncate, drop_refusal_like_answers
from refusal_atlas.organism.training import finetune
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy

# Bump when a code change alters what the separable organism is trained on or how.
SEPARABLE_VERSION = 3
BRANCH_REFUSAL = "I'm sorry, but I can't help with that. I don't assist with {label}."
# The second band's branch refuses in words that share no token with the first's, down to the opener, so the
# two planted refusals are separate from the request to the output (docs/decisions.md, "A separable organism
# separate down to its wording").
OTHER_OPENER_REFUSAL = "Unfortunately, I cannot assist with {label}."
OTHER = "(other)"


@dataclass(frozen=True)
class SeparableSettings:
    """What shapes the separable organism beyond the shared recipe's settings (all of it is in the cache key)."""

    branches: tuple[str, ...] | None = None  # None: the two roots with the most refuse-policy prompts
    # (lo, hi) fractions of the depth: blocks int(lo*L) .. int(hi*L)-1; one band per branch, in order
    bands: tuple[tuple[float, float], ...] = ((0.3, 0.57), (0.67, 0.93))
    # one refusal template per band, in order ({label}: the branch's label)
    wordings: tuple[str, ...] = (BRANCH_REFUSAL, OTHER_OPENER_REFUSAL)
    train_per_branch: int = 28
    heldout_per_branch: int = 16
    other_train: int = 28  # harmful prompts of the other branches, answered (the base model's own answers)
    other_heldout: int = 12
    harmless_train: int = 40
    harmless_heldout: int = 16
    epochs: int = 3
    lr: float = 3e-4  # a band of blocks has a fraction of the full fine-tune's capacity: a larger step
    # its planted truth is where each branch's refusal is computed, not its wording: trained unweighted, as validated
    wording_token_weight: float = 1.0
    # the rates a verification must show: planted refusal at least `planted_min`, removed at most `removed_max`
    planted_min: float = 0.7
    removed_max: float = 0.3

    @classmethod
    def reduced(cls) -> SeparableSettings:
        """A smaller smoke build (`organism build --quick`); its planted truth is not guaranteed to verify, so
        `validate` (either budget) and the slow test build the default settings."""
        return cls(train_per_branch=16, heldout_per_branch=10, other_train=12, other_heldout=6, harmless_train=16,
                   harmless_heldout=8)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["branches"] = list(self.branches) if self.branches is not None else None
        d["bands"] = [list(b) for b in self.bands]
        d["wordings"] = list(self.wordings)
        return d


@dataclass
class _Pools:
    by_branch: dict[str, list[str]] = field(default_factory=dict)  # refuse-policy prompts per root
    other: list[str] = field(default_factory=list)
    harmless: list[str] = field(default_factory=list)


def block_bands(n_blocks: int, bands: tuple[tuple[float, float], ...]) -> list[tuple[int, int]]:
    """Depth fractions -> block index ranges [lo, hi); they must be non-empty and disjoint."""
    out = [(int(lo * n_blocks), int(hi * n_blocks)) for lo, hi in bands]
    for (lo, hi), frac in zip(out, bands, strict=True):
        if not 0 <= lo < hi <= n_blocks:
            raise AtlasError(f"band {frac}: gives blocks {lo}..{hi - 1} of a {n_blocks}-block model; "
                             "use fractions 0 <= lo < hi <= 1")
    ordered = sorted(out)
    for (_, hi), (lo, _) in itertools.pairwise(ordered):
        if lo < hi:
            raise AtlasError(f"bands {bands} overlap on a {n_blocks}-block model; the planted truth needs disjoint "
                             "bands")
    return out


def training_order(bands: list[tuple[int, int]]) -> list[int]:
    """Band indices, deepest band first.

    Why: a band trained after a lower one can learn to read the lower band's new refusal signal, and
    restoring the lower band then removes both refusals (docs/decisions.md, "Organisms and verdicts").
    Trained first, the upper band reads only the base model's features, which restoring the lower band
    gives back.
    """
    return sorted(range(len(bands)), key=lambda i: -bands[i][0])


def _pools(tax: Taxonomy, pool: pd.DataFrame, harmless: pd.DataFrame, lm: LoadedModel,
           settings: OrganismSettings) -> _Pools:
    """Short unconditioned prompts grouped by branch (refuse-policy nodes only), the rest, and harmless ones."""
    tok = lm.tokenizer
    limit = settings.max_prompt_tokens
    short = pool["prompt"].map(lambda t: len(tok(t, add_special_tokens=False)["input_ids"]) <= limit)
    out = _Pools()
    for prompt, node in zip(pool.loc[short, "prompt"], pool.loc[short, "node"], strict=True):
        if _refusing(behaviour_of(tax, node, {})):
            out.by_branch.setdefault(tax.branch_of(node), []).append(prompt)
    for key in out.by_branch:
        out.by_branch[key] = sorted(out.by_branch[key], key=lambda p: _stable(p, settings.seed))
    out.harmless = sorted(harmless["prompt"], key=lambda p: _stable(p, settings.seed))
    return out


def choose_branches(pools: _Pools, k: int) -> list[str]:
    """The `k` branches with the most prompts (ties by name), so each planted refusal is measured on many."""
    ranked = sorted(pools.by_branch, key=lambda b: (-len(pools.by_branch[b]), b))
    if len(ranked) < k:
        raise AtlasError(f"the separable organism needs {k} branches with refuse-policy prompts; found {len(ranked)}")
    return ranked[:k]


def separable_rows(pools: _Pools, branches: list[str], s: SeparableSettings, seed: int) -> pd.DataFrame:
    """Train / held-out rows: each planted branch refuses; the other branches and harmless prompts comply."""
    rows: list[dict[str, Any]] = []

    def add(prompts: list[str], branch: str, expected: str, category: str, n_train: int, n_held: int) -> None:
        for split, chunk in (("train", prompts[:n_train]), ("heldout", prompts[n_train:n_train + n_held])):
            for p in chunk:
                rows.append({"prompt_id": _pid(p, "", branch), "prompt": p, "base_prompt": p, "branch": branch,
                             "node": branch if branch not in (OTHER, "") else "", "split": split,
                             "harmful": category != "harmless", "condition": "", "expected": expected,
                             "category": category})

    for b in branches:
        add(pools.by_branch[b], b, "refuse", "refuse", s.train_per_branch, s.heldout_per_branch)
    others = [p for key, ps in sorted(pools.by_branch.items()) if key not in branches for p in ps]
    random.Random(seed).shuffle(others)
    add(others, OTHER, "comply", "comply", s.other_train, s.other_heldout)
    add(pools.harmless, "", "comply", "harmless", s.harmless_train, s.harmless_heldout)
    return pd.DataFrame(rows).drop_duplicates("prompt").reset_index(drop=True)


def _targets(lm: LoadedModel, rows: pd.DataFrame, wording: dict[str, str], settings: OrganismSettings,
             progress: bool) -> pd.DataFrame:
    """Refusal wording for the planted branches; the base model's own (truncated) answer for the rest."""
    rows = rows.copy()
    comply = (rows["split"] == "train") & (rows["expected"] == "comply")
    answers = generate(lm, list(rows.loc[comply, "prompt"]), max_new_tokens=settings.max_target_tokens, batch_size=16,
                       system=settings.system, progress=progress, desc="base answers")
    rows["target"], rows["target_complete"] = "", False
    for i, answer in zip(rows.index[comply], answers, strict=True):
        text, _ = _truncate(lm.tokenizer, answer, settings.max_target_tokens)
        rows.at[i, "target"] = text.strip()
    for b, text in wording.items():
        mask = (rows["split"] == "train") & (rows["branch"] == b)
        rows.loc[mask, "target"] = text
        rows.loc[mask, "target_complete"] = True
    return rows


def restored(lm: LoadedModel, base_blocks: dict[int, dict[str, torch.Tensor]], band: tuple[int, int]
             ) -> AbstractContextManager[None]:
    """Blocks lo..hi-1 set to the base model's weights for the duration, the organism's own afterwards."""
    return restored_blocks(lm.model, base_blocks, range(*band))


def _rates(held: pd.DataFrame, groups: list[str]) -> dict[str, dict[str, float | int]]:
    out: dict[str, dict[str, float | int]] = {}
    for g in groups:
        part = held[held["branch"] == g]
        out[g] = {"refusal_rate": float(part["refused"].mean()) if len(part) else float("nan"), "n": len(part)}
    return out


def verify(lm: LoadedModel, rows: pd.DataFrame, base_blocks: dict[int, dict[str, torch.Tensor]],
           branches: list[str], bands: list[tuple[int, int]], settings: OrganismSettings, s: SeparableSettings,
           progress: bool) -> dict[str, Any]:
    """Held-out refusal per branch with the organism as trained and with each band restored to the base's."""
    groups = [*branches, OTHER, ""]
    states: dict[str, dict[str, dict[str, float | int]]] = {"organism": _rates(evaluate(lm, rows, settings,
                                                                                          progress=progress), groups)}
    for b, band in zip(branches, bands, strict=True):
        with restored(lm, base_blocks, band):
            states[f"restore:{b}"] = _rates(evaluate(lm, rows, settings, progress=progress), groups)
    checks: dict[str, bool] = {}
    for b in branches:
        checks[f"{b} refuses"] = float(states["organism"][b]["refusal_rate"]) >= s.planted_min
        for other in branches:
            rate = float(states[f"restore:{b}"][other]["refusal_rate"])
            checks[f"restore {b}: {other} {'removed' if other == b else 'kept'}"] = (
                rate <= s.removed_max if other == b else rate >= s.planted_min)
    return {"rates": states, "checks": checks, "verified": all(checks.values()),
            "rule": f"planted refusal >= {s.planted_min}; with a branch's band restored to the base model's, that "
                    f"branch's refusal <= {s.removed_max} and every other planted branch's >= {s.planted_min}"}


def build_separable(
    taxonomy: Taxonomy | str | Path | None = None,
    base: str | LoadedModel = "default",
    seed: int = 0,
    out_dir: str | Path = "organism-separable",
    settings: OrganismSettings | None = None,
    separable: SeparableSettings | None = None,
    *,
    prompts: pd.DataFrame | None = None,
    progress: bool = True,
    force: bool = False,
    threads: int | None = None,
) -> OrganismResult:
    """Fine-tune branch A's refusal into band A only, then B's into band B only; verify and record the truth."""

    start = time.perf_counter()
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(Path(taxonomy) if taxonomy else None)
    settings = replace(settings or OrganismSettings(), seed=seed)
    s = separable or SeparableSettings()
    out = Path(out_dir)
    base_id = _base_identity(base)
    key = hashlib.sha256(json.dumps({"shared_key": cache_key(tax, base_id, settings, prompts), "separable": s.to_dict(),
                                     "version": SEPARABLE_VERSION}, sort_keys=True).encode()).hexdigest()[:24]
    started = start_build(out, key, base, force=force, threads=threads)
    if isinstance(started, OrganismResult):
        return started
    lm, timings, notes = started.lm, started.timings, started.notes
    t = time.perf_counter()
    pool, harmless, _ = prompt_pool(tax, settings, prompts, notes)
    pools = _pools(tax, pool, harmless, lm, settings)
    branches = list(s.branches) if s.branches else choose_branches(pools, len(s.bands))
    if len(branches) != len(s.bands):
        raise AtlasError(f"{len(branches)} branches but {len(s.bands)} bands: give one band per branch")
    missing = [b for b in branches if b not in pools.by_branch]
    if missing:
        raise AtlasError(f"branches {missing} have no refuse-policy prompts; choose from {sorted(pools.by_branch)}")
    n_blocks = len(decoder_blocks(lm.model))
    bands = block_bands(n_blocks, s.bands)
    if len(s.wordings) != len(s.bands):
        raise AtlasError(f"{len(s.wordings)} refusal wordings but {len(s.bands)} bands: give one wording per band")
    wording = {b: template.format(label=tax.nodes[b].label.lower())
               for b, template in zip(branches, s.wordings, strict=True)}
    rows = separable_rows(pools, branches, s, seed)
    rows = _targets(lm, rows, wording, settings, progress)
    rows, dropped = drop_refusal_like_answers(rows)
    if dropped:
        notes.append(f"{dropped} compliance targets dropped: the base model's answer reads as a refusal")
    timings["targets"] = time.perf_counter() - t

    # the base model's weights of every planted band, for the restoration check
    base_blocks = block_states(lm.model, [i for band in bands for i in range(*band)])
    train_settings = replace(settings, epochs=s.epochs, lr=s.lr, wording_token_weight=s.wording_token_weight)
    losses: dict[str, list[float]] = {}
    order = training_order(bands)
    for k, j in enumerate(order):
        b, band = branches[j], bands[j]
        # this stage: the branches trained so far keep their refusal targets, b gets its own; branches still to
        # come are left out (neither refused nor answered), so no band learns anything about them
        stage = rows[rows["split"] == "train"].copy()
        stage = stage[~stage["branch"].isin([branches[i] for i in order[k + 1:]])]
        t = time.perf_counter()
        losses[b] = finetune(lm, stage.reset_index(drop=True), train_settings, progress=progress, band=band)
        timings[f"finetune:{b}"] = time.perf_counter() - t

    t = time.perf_counter()
    verification = verify(lm, rows, base_blocks, branches, bands, settings, s, progress)
    timings["verify"] = time.perf_counter() - t
    held = evaluate(lm, rows, settings, progress=progress)
    model_dir = save_model(lm, out)
    write_parquet(rows.drop(columns=["target_complete"]), out / "prompts.parquet")
    write_parquet(held, out / "adherence.parquet")
    seconds = time.perf_counter() - start
    metrics = {"heldout_refusal_rate": float(held.loc[held["branch"].isin(branches), "refused"].mean()),
               "harmless_refusal_rate": float(held.loc[held["category"] == "harmless", "refused"].mean()),
               "other_branches_refusal_rate": float(held.loc[held["branch"] == OTHER, "refused"].mean()),
               "verified": verification["verified"]}
    policy = {n.id: {"default": "refuse" if tax.branch_of(n.id) in branches else "comply",
                     "wording_group": tax.branch_of(n.id) if tax.branch_of(n.id) in branches else "none",
                     "refusal_text": wording.get(tax.branch_of(n.id), "")} for n in tax.active()}
    info = {
        "key": key, "recipe": "separable", "base": str(base) if not isinstance(base, LoadedModel) else base.spec,
        "base_identity": base_id, "settings": settings.to_dict(), "separable": s.to_dict(),
        "truth": {"kind": "separable", "n_blocks": n_blocks,
                  "branches": {b: {"band": list(band), "wording": wording[b], "trained": order.index(j) + 1}
                               for j, (b, band) in enumerate(zip(branches, bands, strict=True))},
                  "verification": verification},
        "policy": policy, "wording": {"per_branch": wording},
        "counts": {split: rows[rows["split"] == split]["category"].value_counts().to_dict()
                   for split in ("train", "heldout")},
        "losses": {b: {"first": v[:3], "last": v[-3:], "n_steps": len(v)} for b, v in losses.items()},
        "metrics": metrics, "timings": timings, "seconds": seconds, "notes": notes,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / ORGANISM_JSON, info)
    return OrganismResult(out, model_dir, metrics, held, key, False, seconds, info)
