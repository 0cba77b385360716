"""A clusters folder as the cluster stage writes it (curation's layout): clusters, their mapping, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.store_read import as_float, flat_scalars, read_json, read_table

__all__ = ["ClusterInfo", "ClusterView"]

OUTLIER_ID = "-1"  # HDBSCAN's label for points in no cluster


@dataclass
class ClusterInfo:
    """One bottom-up cluster and what it maps to (the fields the report and links need)."""

    id: str
    label: str = ""
    size: int | None = None
    keywords: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    stability: float | None = None
    best_nodes: list[tuple[str, float | None]] = field(default_factory=list)
    outlier: bool = False
    fits: bool | None = None  # mapping's verdict: the best node's score clears the threshold
    method: str = ""  # how the mapping was scored (label_majority, similarity)

    @property
    def linked_nodes(self) -> list[tuple[str, float | None]]:
        """The node links to assert (all candidates unless the mapping said the cluster fits no node)."""
        return [] if self.fits is False else self.best_nodes


@dataclass
class ClusterView:
    """One clusters folder: assignments.parquet, clusters.json, stability.json, mapping.json, proposals.yaml."""

    folder: Path

    def exists(self) -> bool:
        return self.folder.is_dir() and (self.assignments is not None or bool(self.clusters))

    @cached_property
    def assignments(self) -> pd.DataFrame | None:
        """One row per clustered text: `cluster` (str; "-1" = outliers), `x`, `y` (2-D map), `text`, ..."""
        df = read_table(self.folder / schema.ASSIGNMENTS.name)
        if df is not None:
            df["cluster"] = df["cluster"].astype(str)
        return df

    @cached_property
    def clusters(self) -> list[ClusterInfo]:
        """Every cluster with its label, size, keywords, examples, stability and best node(s) with scores."""
        info: dict[str, ClusterInfo] = {}
        path = self.folder / schema.CLUSTERS_JSON.name
        if path.is_file():
            for raw in read_json(path).get("clusters", []):
                c = _cluster_from_record(raw)
                info[c.id] = c
        mapping = self.mapping
        if mapping is not None:
            for cid, rows in mapping.groupby(mapping["cluster"].astype(str), sort=False):
                c = info.setdefault(cid, ClusterInfo(id=cid))
                c.best_nodes = [(str(n), as_float(s)) for n, s in zip(rows["node"], rows["score"], strict=True)
                                if isinstance(n, str) and n]
                c.fits = bool(rows["fits"].iloc[0])
                c.method = str(rows["method"].iloc[0])
        if self.assignments is not None:
            for cid, n in self.assignments["cluster"].value_counts().items():
                c = info.setdefault(str(cid), ClusterInfo(id=str(cid)))
                if c.size is None:
                    c.size = int(n)
        for c in info.values():
            c.outlier = c.outlier or c.id == OUTLIER_ID
        return sorted(info.values(), key=lambda c: (c.outlier, -(c.size or 0), c.id))

    @cached_property
    def mapping(self) -> pd.DataFrame | None:
        """cluster -> node with `score` (one row per (cluster, candidate node), best first), `fits`, `method`."""
        path = self.folder / schema.MAPPING_JSON.name
        if not path.is_file():
            return None
        rows = []
        for item in read_json(path).get("clusters", []):
            base = {"cluster": item["cluster"], "size": item.get("size"), "fits": item["fits"],
                    "method": item["method"]}
            rows += [{**base, "node": m["node"], "score": m["score"]} for m in item["matches"]] or [
                {**base, "node": None, "score": None}]
        return pd.DataFrame(rows) if rows else None

    @cached_property
    def tree_mapping(self) -> dict[str, Any]:
        """The mapping's `tree`: the branch level's clusters linked to branches, every level's ARI; {} if absent."""
        path = self.folder / schema.MAPPING_JSON.name
        data = read_json(path) if path.is_file() else None
        tree = data.get("tree") if isinstance(data, dict) else None
        return tree if isinstance(tree, dict) else {}

    @cached_property
    def net_of(self) -> dict[str, Any]:
        """How the clustered texts were made net of another column (column, lambda, explained variance); {} if not."""
        path = self.folder / schema.CLUSTERS_JSON.name
        data = read_json(path) if path.is_file() else None
        net = data.get("net_of") if isinstance(data, dict) else None
        return net if isinstance(net, dict) else {}

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """Scalar run numbers (n_clusters, outlier fraction, seed ARI, node ARI / NMI, ...), flattened."""
        out: dict[str, Any] = {}
        for artifact, keys in ((schema.CLUSTERS_JSON, ("n_clusters", "outlier_fraction", "method",
                                                       "reassigned_outliers", "stability", "net_of")),
                               (schema.MAPPING_JSON, ("agreement", "min_score", "node_ari", "seed_ari")),
                               (schema.STABILITY_JSON, ("seeds", "resamples"))):
            path = self.folder / artifact.name
            data = read_json(path) if path.is_file() else None
            if not isinstance(data, dict):
                continue
            for key in keys:
                if key in data:
                    for flat_key, flat_value in flat_scalars(data[key], key).items():
                        out.setdefault(flat_key, flat_value)
        return out

    @property
    def proposals_file(self) -> Path | None:
        path = self.folder / schema.PROPOSALS.name
        return path if path.is_file() else None


def _cluster_from_record(raw: dict[str, Any]) -> ClusterInfo:
    """A clusters.json entry: id, size, keywords, label, representatives [{row, text}], stability {seed_jaccard}."""
    stability = raw.get("stability")
    if isinstance(stability, dict):
        stability = stability.get("seed_jaccard")
    size = raw.get("size")
    return ClusterInfo(
        id=str(raw["id"]), label=str(raw.get("label") or ""), size=int(size) if size is not None else None,
        keywords=[str(k) for k in raw.get("keywords", [])],
        examples=[str(r["text"]) for r in raw.get("representatives", [])],
        stability=as_float(stability), outlier=str(raw["id"]) == OUTLIER_ID,
    )
