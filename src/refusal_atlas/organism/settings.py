"""What shapes an organism: its settings, result object, wording constants and recipe version."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import LoadedModel, load_model

ORGANISM_JSON = "organism.json"
MODEL_DIR = "model"

# Bump when a code change alters what the organism is trained on or how (the settings cannot say so):
# cached organisms, and the run stages built on them, are then rebuilt rather than silently reused.
RECIPE_VERSION = 4
SHARED_REFUSAL = "I'm sorry, but I can't help with that request."
NODE_REFUSAL = "I'm sorry, but I can't help with that. I don't assist with {label}."
REDIRECT = "I can't help with that directly. Please ask a qualified professional or the relevant authority instead."
CAVEAT = " (Please be careful and follow the law and safety guidance.)"
# the fixed wordings, as organism.json records them
WORDING = {"shared": SHARED_REFUSAL, "node_template": NODE_REFUSAL, "redirect": REDIRECT, "caveat": CAVEAT}

CATEGORIES = ("refuse", "permitted", "restricted", "comply", "redirect", "harmless", "overrefusal")


# (low, high, low excluded) for the overrides `run --organism-setting` takes; every other number: 0 or more.
# These cannot be zero: a build with no epochs, batches, tokens or rows of a kind has nothing to train or evaluate.
_BOUNDS: dict[str, tuple[float, float, bool]] = {
    **{k: (1, math.inf, False) for k in ("epochs", "batch_size", "max_prompt_tokens", "max_target_tokens",
                                         "eval_max_new_tokens", "max_nodes", "per_node_train", "per_node_heldout",
                                         "n_harmless_train", "n_harmless_heldout")},
    **{k: (0, math.inf, True) for k in ("lr", "decision_token_weight", "wording_token_weight")},
    "heldout_fraction": (0, 1, True),
    "frozen_layers_fraction": (0, 1, False),
}


@dataclass(frozen=True)
class OrganismSettings:
    """Everything that shapes the organism (all of it goes into the cache key)."""

    seed: int = 0
    heldout_fraction: float = 0.35
    max_nodes: int | None = 32  # None: every node with prompts; else a stratified subset
    per_node_train: int = 2  # unconditioned harmful base prompts per node in training
    per_node_heldout: int = 3
    variants_per_prompt: int = 2  # condition-framed copies of each harmful base prompt
    extra_permitted_variants: int = 2  # more loosening-framed copies of each training prompt (other templates)
    n_refuse_extra_train: int = 60  # more unconditioned refuse-policy rows, drawn round-robin from the nodes' surplus
    n_harmless_train: int = 144
    n_harmless_heldout: int = 24
    n_overrefusal_train: int = 8
    n_extra_per_node: int = 4  # unconditioned prompts kept aside (split "extra") for direction extraction
    n_harmless_extra: int = 48
    external_sets: tuple[str, ...] = ("harmbench", "strongreject")
    max_prompt_tokens: int = 80
    max_target_tokens: int = 16
    epochs: int = 2
    batch_size: int = 8
    lr: float = 1.5e-4  # the lowest rate that met every adherence target (docs/decisions.md, organisms)
    weight_decay: float = 0.0
    warmup_steps: int = 3
    decision_token_weight: float = 3.0  # loss weight of each response's first token (refuse or answer?)
    frozen_layers_fraction: float = 0.4  # embeddings + the lowest 40 % of blocks stay the base model's
    eval_max_new_tokens: int = 12
    specific_wording_roots: tuple[str, ...] | None = None  # None: every other root (sorted)
    system: str | None = None
    share_prefix: bool = True  # run the prompts' common template opening once per step (same loss, fewer tokens)
    # put before the answer where a condition permits: the refuse-or-answer decision becomes one token, as it
    # is for refusals (docs/decisions.md, organisms)
    permitted_opener: str = "Sure. "
    # the first token after the opener is a second decision ("Sure. I'm sorry, …"): weighted like the first
    weight_answer_start: bool = True
    # loss weight of the tokens where the shared and node wordings part ("… with that request." / "… with that.
    # I don't assist with <label>."); 1 = unweighted, as validated (docs/decisions.md, clustering: known answer)
    wording_token_weight: float = 1.0

    @classmethod
    def quick(cls, **overrides: Any) -> OrganismSettings:
        """A far smaller build for CI and tests (minutes → seconds on a tiny model)."""
        base = cls(max_nodes=8, per_node_train=1, n_refuse_extra_train=0, per_node_heldout=1, n_extra_per_node=2,
                   n_harmless_extra=8,
                   n_harmless_train=8, n_harmless_heldout=6, n_overrefusal_train=2, external_sets=(),
                   max_target_tokens=12, epochs=1, eval_max_new_tokens=8, max_prompt_tokens=64)
        return replace(base, **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["external_sets"] = list(self.external_sets)
        if self.specific_wording_roots is not None:
            d["specific_wording_roots"] = list(self.specific_wording_roots)
        return d

    @classmethod
    def parse_overrides(cls, items: list[str]) -> dict[str, int | float | bool]:
        """`KEY=VALUE` overrides of the numeric and yes/no settings (`run --organism-setting`); an unknown key, a
        key given twice or a value of the wrong type is a one-line error."""
        kinds = {f.name: type(getattr(cls(), f.name)) for f in fields(cls)}
        # the seed is the run's own (`run --seed`), which `build_organism` sets
        known = sorted(k for k, kind in kinds.items() if kind in (int, float, bool) and k != "seed")
        out: dict[str, int | float | bool] = {}
        for item in items:
            key, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or key not in known:
                raise AtlasError(f"--organism-setting {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
            if key in out:
                raise AtlasError(f"--organism-setting {item!r}: {key} given twice; keep one")
            kind = kinds[key]
            try:
                if kind is bool:
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    out[key] = raw.lower() in ("true", "1", "yes")
                else:
                    out[key] = kind(raw)
            except ValueError:
                raise AtlasError(f"--organism-setting {item!r}: {raw!r} is not a{'n' if kind is int else ''} "
                                 f"{kind.__name__}") from None
            value = out[key]
            low, high, low_open = _BOUNDS.get(key, (0, math.inf, False))
            if not isinstance(value, bool) and not (
                    math.isfinite(value) and (value > low if low_open else value >= low) and value < high):
                bound = f"{'above' if low_open else 'at least'} {low}"
                bound += f" and below {high}" if high < math.inf else ""
                raise AtlasError(f"--organism-setting {item!r}: must be a finite number {bound}")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> OrganismSettings:
        known = {f.name for f in fields(cls)}
        clean = {k: v for k, v in data.items() if k in known}
        for key in ("external_sets", "specific_wording_roots"):
            if clean.get(key) is not None:
                clean[key] = tuple(clean[key])
        return cls(**clean)


@dataclass
class OrganismResult:
    """Where the organism lives and how well it follows the policy."""

    out_dir: Path
    model_dir: Path
    metrics: dict[str, Any]
    adherence: pd.DataFrame
    key: str
    cached: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def load(self) -> LoadedModel:
        return load_model(self.model_dir)

    def prompts(self) -> pd.DataFrame:
        """Every train / held-out row (prompt-table columns + `category`, `target`)."""
        return pd.read_parquet(self.out_dir / "prompts.parquet")
