"""The clusters folder: assignments persisted as data, so reloading never re-assigns.

Layout of a clusters folder (written by `curate cluster`, read by `curate map`):

    assignments.parquet   one row per clustered corpus row, joinable with the input:
                          `row` (0-based position of the row in the input table: the Parquet row,
                          the CSV data row after the header, the JSONL line; stable across runs, so
                          `input.iloc[row]` is the clustered row), `text` (the clustered column),
                          `label_text` (with --label-by), `cluster` (the flat resolution, -1 =
                          outlier), `cluster_level_0` (coarsest) .. `cluster_level_<L-1>` (leaves) of
                          the cluster tree, `confidence`, `reassigned` (outlier moved by
                          --reassign-outliers), `fitted` (False = assigned from its nearest fitted
                          rows), `x`, `y` (2-D map), then every other input column under its own
                          name (the input's id column, e.g. `prompt_id`, included; a name the
                          pipeline uses itself is carried as `input_<name>`, the prefix
                          repeated until the name is free)
    embeddings.npy        float32 unit vectors, aligned with assignments.parquet: the vectors
                          clustered (with --net-of, the text's residual after the column's content
                          is taken out; `curate map` then embeds the label texts to map by)
    clusters.json         run metadata: input file + sha256, text / label / id columns, embedder,
                          every parameter, method, timings, warnings (nothing clustered, most
                          rows outliers), `tree` (per level: cluster count, seed ARI, clusters
                          with size, parent and keywords; the flat level and its rule), and per
                          flat cluster: size, keywords, representatives (row + text), stability
    stability.json        seed / bootstrap ARI (flat and per tree level), per-cluster Jaccard,
                          min_cluster_size sweep (absent when nothing was clustered)
    map.html, sizes.html, stability.html   interactive plots (plotly inlined; work offline)
    mapping.json, map_nodes.html, proposals.yaml   written by `curate map` (see `map_folder`)
    assignments.parquet.rejects.jsonl      corpus rows that could not be clustered, with reason

Every file is written atomically (refusal_atlas.io).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.curation.tables import write_table
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_json, brief, read_json_file

FORMAT = "refusal-atlas.clusters/1"
ASSIGNMENTS = "assignments.parquet"
EMBEDDINGS = "embeddings.npy"
META = "clusters.json"
STABILITY = "stability.json"


@dataclass
class ClusterRun:
    """A persisted clustering: the assignments table, its embeddings and the metadata."""

    folder: Path
    assignments: pd.DataFrame
    embeddings: np.ndarray  # the vectors clustered (net of a column where clusters.json's `net_of` says so)
    meta: dict[str, Any]
    # the vectors of the texts clusters are described and mapped by (`mapping.description_vectors` sets them),
    # and the embedder they came from (None: the run's own)
    description: np.ndarray | None = field(default=None, repr=False)
    description_key: str | None = field(default=None, repr=False)

    @property
    def labels(self) -> np.ndarray:
        return self.assignments["cluster"].to_numpy(dtype=np.int64)

    @property
    def texts(self) -> list[str]:
        return self.assignments["text"].astype(str).tolist()

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id", ""))


def save_run(folder: Path, assignments: pd.DataFrame, embeddings: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write assignments, embeddings and clusters.json into `folder` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_table(assignments, folder / ASSIGNMENTS)

    def _write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(embeddings, dtype=np.float32), allow_pickle=False)

    atomic_write(folder / EMBEDDINGS, _write_npy)
    atomic_write_json(folder / META, {"format": FORMAT, **meta}, sort_keys=False)
    return folder


def load_run(folder: Path | str) -> ClusterRun:
    """Read a clusters folder back exactly as written (no model, no re-assignment)."""
    folder = Path(folder)
    for name in (ASSIGNMENTS, META, EMBEDDINGS):
        if not (folder / name).is_file():
            raise AtlasError(f"{folder}: not a clusters folder ({name} missing); run `refusal-atlas curate "
                             "cluster CORPUS -o DIR` first")
    meta = read_json_file(folder / META, "re-run `refusal-atlas curate cluster` into this folder")
    if not isinstance(meta, dict):
        raise AtlasError(f"{folder / META}: not a clusters.json object; re-run `refusal-atlas curate cluster`")
    if meta.get("format") != FORMAT:
        raise AtlasError(f"{folder / META}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    try:
        assignments = pd.read_parquet(folder / ASSIGNMENTS)
        embeddings = np.load(folder / EMBEDDINGS, allow_pickle=False)
    except (OSError, ValueError) as exc:  # pyarrow / numpy errors on a damaged file derive from these
        raise AtlasError(f"{folder}: a file of the clusters folder is damaged ({str(exc)[:120]}); re-run "
                         "`refusal-atlas curate cluster`") from exc
    if "nodes" in assignments.columns:
        assignments["nodes"] = assignments["nodes"].map(
            lambda v: list(v) if isinstance(v, list | tuple | np.ndarray) else [])
    if len(embeddings) != len(assignments):
        raise AtlasError(f"{folder}: {EMBEDDINGS} has {len(embeddings)} rows but {ASSIGNMENTS} has "
                         f"{len(assignments)}; re-run `curate cluster`")
    problem = _problem(assignments, embeddings, meta)
    if problem:
        raise AtlasError(f"{folder}: {problem}; the folder was edited or damaged: re-run "
                         "`refusal-atlas curate cluster`")
    return ClusterRun(folder, assignments, embeddings, meta)


# clusters.json keys the readers use, with the JSON type each must have when present
_META_TYPES: dict[str, type | tuple[type, ...]] = {"clusters": list, "tree": dict, "embedder": dict, "input": dict,
                                                   "stability": (dict, type(None)), "warnings": list}


def _problem(assignments: pd.DataFrame, embeddings: np.ndarray, meta: dict[str, Any]) -> str | None:
    """What makes a clusters folder unreadable by `curate map` and the run (None: nothing); checked once here so
    a hand-edited or truncated file is one line, not a traceback deep in the mapping."""
    missing = [c for c in ("row", "text", "cluster") if c not in assignments.columns]
    if missing:
        return f"{ASSIGNMENTS} lacks column(s) {', '.join(missing)}"
    for col in ["row", "cluster", *(c for c in map(str, assignments.columns) if c.startswith("cluster_level_"))]:
        if assignments[col].dtype.kind not in "iu":
            bad = next((i for i, v in enumerate(assignments[col].tolist()) if not isinstance(v, int)), 0)
            value = brief(assignments[col].iloc[bad])
            return f"{ASSIGNMENTS} column {col} holds {value} at row {bad}, not a whole number"
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        return f"{EMBEDDINGS} is a {embeddings.ndim}-D {embeddings.dtype} array, not rows of float vectors"
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        return f"{EMBEDDINGS} row {int(np.argmin(finite))} is not finite (NaN or inf)"
    for key, kind in _META_TYPES.items():
        if key in meta and not isinstance(meta[key], kind):
            return f"{META}: `{key}` is a {type(meta[key]).__name__}, not a {getattr(kind, '__name__', 'object')}"
    if any(not isinstance(c, dict) or not isinstance(c.get("id"), int) for c in meta.get("clusters", [])):
        return f"{META}: an entry of `clusters` is not an object with a whole-number id"
    levels = meta.get("tree", {}).get("levels", [])
    if not isinstance(levels, list) or any(not isinstance(lv, dict) for lv in levels):
        return f"{META}: `tree.levels` is not a list of objects"
    return None
