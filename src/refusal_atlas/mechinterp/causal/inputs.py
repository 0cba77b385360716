"""What the causal steps read: the direction prompts, and evaluation sets drawn from a prompt table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.capture import Activations, load_shards
from refusal_atlas.lm.positions import Position
from refusal_atlas.mechinterp.causal.files import DIRECTION_PROMPTS, write_table
from refusal_atlas.mechinterp.directions import Groups
from refusal_atlas.taxonomy.model import Taxonomy

__all__ = ["DirectionPrompts", "direction_node_of", "eval_sets_from_table"]


@dataclass(frozen=True)
class DirectionPrompts:
    """The prompts a direction set was computed from, with their captured activations.

    `acts.acts` is `[n_prompts, n_layers, n_positions, d_model]`; `nodes[i]` is prompt i's group ("" for a
    harmless prompt), `harmful[i]` its label, and `strata[i]` the request form the harmless baseline was
    matched on (None: unmatched).
    """

    acts: Activations
    prompts: list[str]
    nodes: list[str]
    harmful: list[bool]
    strata: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.acts)
        if not len(self.prompts) == len(self.nodes) == len(self.harmful) == n or (
                self.strata is not None and len(self.strata) != n):
            raise AtlasError(f"direction prompts: {len(self.prompts)} prompts / {len(self.nodes)} labels for {n} "
                             "captured activations; capture them again")

    def table(self) -> pd.DataFrame:
        """The `DIRECTION_PROMPTS` table (request form "" where unmatched)."""
        return pd.DataFrame({"prompt": self.prompts, "analysis_node": self.nodes, "harmful": self.harmful,
                             "request_form": self.strata if self.strata is not None else [""] * len(self.nodes)})

    def save(self, folder: str | Path) -> Path:
        """Write the labels beside a direction set (the activations stay in their capture folder)."""
        return write_table(self.table(), folder, DIRECTION_PROMPTS)

    @classmethod
    def load(cls, acts_dir: str | Path, folder: str | Path) -> DirectionPrompts | None:
        """The capture in `acts_dir` with the labels in `folder/prompts.parquet`; None when either is absent."""
        labels_file = Path(folder) / DIRECTION_PROMPTS.name
        if not Path(acts_dir).is_dir() or not labels_file.is_file():
            return None
        labels = pd.read_parquet(labels_file)
        forms = labels["request_form"].astype(str).tolist() if "request_form" in labels else []
        return cls(load_shards(acts_dir), labels["prompt"].tolist(), labels["analysis_node"].astype(str).tolist(),
                   labels["harmful"].astype(bool).tolist(), forms if any(forms) else None)

    def at(self, layer: int, position: Position) -> torch.Tensor:
        """Activations `[n_prompts, d_model]` at one layer and position, in float32."""
        return self.acts.acts[:, self.acts.layer_index(layer), self.acts.position_index(position)].float()

    def groups(self, what: str) -> Groups:
        """The groups the directions were computed over (harmless baseline matched on `strata` where given)."""
        if not any(self.harmful) or all(self.harmful):
            raise AtlasError(f"{what}: need harmful and harmless direction prompts")
        return Groups.from_labels(list(self.nodes), list(self.harmful), strata=self.strata)


def direction_node_of(node: str, direction_nodes: Sequence[str], taxonomy: Taxonomy | None = None) -> str | None:
    """The direction a prompt's node is measured against: itself, else its nearest ancestor with one."""
    if node in direction_nodes:
        return node
    if taxonomy is not None and node in taxonomy.nodes:
        for anc in taxonomy.ancestors(node):
            if anc in direction_nodes:
                return anc
    return None


def eval_sets_from_table(
    df: pd.DataFrame,
    direction_nodes: Sequence[str],
    *,
    taxonomy: Taxonomy | None = None,
    split: str | None = "heldout",
    categories: Sequence[str] | None = ("refuse",),
    expected: Sequence[str] | None = ("refuse",),
) -> tuple[dict[str, list[str]], list[str]]:
    """({direction node: its harmful unconditioned prompts}, harmless prompts) from a prompt table.

    Rows are filtered by `split` (when the table has that split), `category` (organism tables) or
    `expected` (prompt-set tables); harmless = harmful False and not an over-refusal probe.
    """
    t = df.copy()
    if split and "split" in t and (t["split"] == split).any():
        t = t[t["split"] == split]
    cond = t["condition"].fillna("") if "condition" in t else pd.Series([""] * len(t), index=t.index)
    t = t[cond == ""]
    harmful = t[t["harmful"].astype(bool)]
    if categories is not None and "category" in harmful:
        harmful = harmful[harmful["category"].isin(categories)]
    elif expected is not None and "expected" in harmful:
        harmful = harmful[harmful["expected"].isin(expected)]
    sets: dict[str, list[str]] = {}
    for prompt, node in zip(harmful["prompt"], harmful["node"], strict=True):
        target = direction_node_of(str(node), direction_nodes, taxonomy)
        if target is not None:
            sets.setdefault(target, []).append(prompt)
    not_harmful = t[~t["harmful"].astype(bool)]
    if "source" in not_harmful:
        not_harmful = not_harmful[not_harmful["source"] != "overrefusal"]
    return sets, list(not_harmful["prompt"])
