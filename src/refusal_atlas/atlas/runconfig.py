"""What `refusal-atlas run` depends on (`RunConfig`) and the run's prompt tables as the model stages read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.curation.cluster_stages import ClusterConfig
from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy

__all__ = ["DEFAULT_OUT", "RunConfig", "evaluation_rows", "model_prompts", "organism_trained", "parse_sizes",
           "run_taxonomy"]

DEFAULT_OUT = Path("atlas-out")


@dataclass
class RunConfig:
    """Everything `run` depends on; each stage's cache key uses the parts it reads."""

    model: str = "default"
    taxonomy: Path | None = None
    out: Path = DEFAULT_OUT
    quick: bool = False
    resume: bool = True
    seed: int = 0
    sets: tuple[str, ...] = ("harmbench", "strongreject", "harmless", "overrefusal", "taxonomy")
    organism: bool | None = None  # None: build one when the model is `default` (it never refuses)
    max_new_tokens: int = 28  # the longest taught refusal wording is 24 tokens
    batch_size: int = 16
    min_prompts: int = 8
    max_nodes: int | None = None
    progress: bool = True
    threads: int | None = None  # torch CPU threads; None: chosen per stage from what other processes leave free
    # the model the analysed one was fine-tuned from (same architecture), for the restoration scan
    reference: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def build_organism(self) -> bool:
        return self.model == "default" if self.organism is None else self.organism

    @property
    def reference_model(self) -> str | None:
        """The reference for the restoration scan: the one given, else the base an organism is built from."""
        if self.reference is not None:
            return self.reference
        return self.model if self.build_organism else None

    def sizes(self) -> dict[str, int]:
        """Per-stage budgets; `quick` keeps CI to a few minutes."""
        if self.quick:
            sizes = {"per_node_train": 10, "per_node_eval": 6, "harmless_train": 40, "harmless_eval": 16,
                     "per_node_val": 2, "harmless_val": 8,
                     "max_nodes": self.max_nodes or 4, "collect_limit": 120, "max_new_tokens": 16,
                     "cluster_seeds": 3, "max_prompt_chars": 320}
        else:
            # Budgeted for 2 CPU cores (timings: docs/decisions.md, "Causal protocol"); raise with
            # `--size key=value` (or RunConfig.extra["sizes"]) on a bigger machine.
            sizes = {"per_node_train": 24, "per_node_eval": 6, "harmless_train": 64, "harmless_eval": 16,
                     "per_node_val": 3, "harmless_val": 16,
                     "max_nodes": self.max_nodes or 6, "collect_limit": 144, "max_new_tokens": self.max_new_tokens,
                     "cluster_seeds": len(ClusterConfig().seeds), "condition_per_node": 32, "max_prompt_chars": 320}
        return {**sizes, **self.extra.get("sizes", {})}


def parse_sizes(items: list[str], known: dict[str, int]) -> dict[str, int]:
    """`KEY=INT` overrides of the stage budgets; an unknown key or a non-integer is a one-line error."""
    out: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise AtlasError(f"--size {item!r}: expected KEY=INT with KEY one of {', '.join(sorted(known))}")
        if key in out and str(out[key]) != value.strip():
            raise AtlasError(f"--size {item!r}: {key} given twice ({out[key]} and {value}); keep one")
        try:
            out[key] = int(value)
        except ValueError:
            raise AtlasError(f"--size {item!r}: {value!r} is not an integer") from None
        if out[key] < 1:
            raise AtlasError(f"--size {item!r}: must be at least 1")
    return out


def run_taxonomy(cfg: RunConfig) -> Taxonomy:
    """The taxonomy the run analyses (the shipped one unless `cfg.taxonomy` names a folder)."""
    return load_taxonomy(cfg.taxonomy)


def model_prompts(out: Path, cfg: RunConfig) -> pd.DataFrame:
    """The run's prompt table minus prompts longer than `max_prompt_chars`, for every stage that runs the model.

    Why: a fifth of HarmBench's prompts carry a long context (up to ~3,800 characters); one of them
    pads a whole batch to hundreds of tokens, and on a CPU every forward pass costs in proportion.
    """
    prompts = pd.read_parquet(out / "prompts.parquet")
    return prompts[prompts["prompt"].str.len() <= cfg.sizes()["max_prompt_chars"]].reset_index(drop=True)


def organism_trained(out: Path) -> set[str]:
    """Base prompts the run's organism was fine-tuned on (empty without an organism)."""
    table = out / "organism" / "prompts.parquet"
    if not table.is_file():
        return set()
    rows = pd.read_parquet(table, columns=["base_prompt", "prompt", "split"])
    trained = rows[rows["split"] == "train"]
    return set(trained["base_prompt"]) | set(trained["prompt"])


def evaluation_rows(prompts: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The run's eval split minus anything the organism trained on (its adherence would be memorised)."""
    ev = prompts[prompts["run_split"] == "eval"]
    trained = organism_trained(out)
    if not trained:
        return ev
    base = ev["base_prompt"].where(ev["base_prompt"].astype(str) != "", ev["prompt"])
    return ev[~(base.isin(trained) | ev["prompt"].isin(trained))]
