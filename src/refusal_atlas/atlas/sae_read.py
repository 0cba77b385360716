"""Read-only access to an atlas's `sae/` folder (what the `sae` stage writes; paths from `atlas.schema`).

Every accessor is None when the stage has not run, like the store's own; an unreadable file is a
one-line error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.atlas.store_read import read_json, read_table

__all__ = ["SaeView", "sae_view"]


@dataclass
class SaeView:
    """The sae stage's files in one atlas folder."""

    root: Path

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        """sae.json: the stage's figures (FVU, L0, tokens, width, k, layer, seconds, sha256, settings)."""
        path = self.root / schema.SAE_JSON.path
        data = read_json(path) if path.is_file() else None
        return data if isinstance(data, dict) else None

    @cached_property
    def features(self) -> pd.DataFrame | None:
        """One row per (node, selected latent): cosine, attribution, activations, contexts, promoted tokens."""
        return read_table(self.root / schema.SAE_FEATURES.path)

    @cached_property
    def clamp(self) -> pd.DataFrame | None:
        """The cross-clamp matrix: refusal on each target node's held-out prompts with a source's K* clamped."""
        return read_table(self.root / schema.SAE_CLAMP.path)

    @cached_property
    def jaccard(self) -> pd.DataFrame | None:
        """Pairs of nodes: Jaccard of their K* sets with bootstrap interval, self-agreement and chance floors."""
        return read_table(self.root / schema.SAE_JACCARD.path)

    @cached_property
    def shared(self) -> pd.DataFrame | None:
        """Per selected latent: how many nodes chose it, which."""
        return read_table(self.root / schema.SAE_SHARED.path)

    @property
    def weights(self) -> Path | None:
        path = self.root / schema.SAE_WEIGHTS.path
        return path if path.is_file() else None


def sae_view(store: AtlasStore) -> SaeView:
    return SaeView(store.root)
