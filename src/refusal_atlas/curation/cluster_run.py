"""`curate cluster` as a library call: read a corpus, embed, cluster, check stability, persist, plot.

The CLI is a thin layer over `cluster_corpus`; a notebook can call it the same way. The
output folder layout is documented in `cluster_store`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.curation import cluster_store, plots
from refusal_atlas.curation.cluster import OUTLIER, ClusterConfig, ClusterPipeline, ClusterResult
from refusal_atlas.curation.embed import make_embedder
from refusal_atlas.curation.stability import stability_report
from refusal_atlas.curation.tables import read_table, reject, require_columns, require_rows, write_rejects
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256, sha256
from refusal_atlas.io import atomic_write_json

CARRIED = ("prompt_id", "node", "nodes", "source", "external_category", "harmful", "refused", "condition",
           "model_id", "prompt")


@dataclass
class Selected:
    """The corpus rows that will be clustered, with their 1-based corpus row numbers."""

    frame: pd.DataFrame
    texts: list[str]
    rejects: list[dict]
    n_input: int


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    try:
        return bool(value) and not pd.isna(value)
    except (TypeError, ValueError):
        return bool(value)


def select_rows(df: pd.DataFrame, path: Path | str, text_column: str, only_refused: bool) -> Selected:
    """Rows to cluster; empty texts go to rejects with their row number (never dropped silently).

    Rows left out by --only-refused are a filter the user asked for, not rejects; their count is
    recorded in clusters.json.
    """
    require_columns(df, [text_column], path, hint="choose the text with --text response|prompt")
    rejects: list[dict] = []
    n_input = len(df)
    if only_refused:
        require_columns(df, ["refused"], path, hint="run `refusal-atlas curate detect` first")
        df = df[df["refused"].map(_truthy)]
    keep = []
    for row, value in zip(df.index, df[text_column], strict=True):
        text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
        if not text.strip():
            reject(rejects, source=path, row=int(row), reason=f"empty {text_column}", record=df.loc[row])
        else:
            keep.append(row)
    selected = df.loc[keep]
    return Selected(selected, [str(v) for v in selected[text_column]], rejects, n_input)


def assignments_frame(sel: Selected, result: ClusterResult) -> pd.DataFrame:
    """The persisted table (see cluster_store): row ids, text, cluster and carried corpus columns."""
    out = pd.DataFrame({"row": np.asarray(sel.frame.index, dtype=np.int64), "text": sel.texts,
                        "cluster": result.labels, "confidence": result.confidence,
                        "reassigned": result.reassigned, "fitted": result.fitted})
    if result.layout_2d is not None:
        out["x"], out["y"] = result.layout_2d[:, 0], result.layout_2d[:, 1]
    for col in CARRIED:
        if col in sel.frame.columns and col not in out.columns:
            values = sel.frame[col].tolist()
            if col == "nodes":
                values = [list(v) if isinstance(v, list | tuple | np.ndarray) else [] for v in values]
            elif col in ("harmful", "refused"):
                values = [_truthy(v) for v in values]
            else:
                values = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]
            out[col] = values
    return out


def cluster_summaries(result: ClusterResult, texts: list[str], rows: np.ndarray,
                      stability: dict | None) -> list[dict]:
    per = (stability or {}).get("per_cluster", {})
    out = []
    sizes = result.sizes()
    for c in sorted(sizes, key=lambda c: (c == OUTLIER, c)):
        entry: dict[str, Any] = {"id": c, "size": sizes[c], "keywords": result.keywords.get(c, [])}
        if c != OUTLIER:
            entry["label"] = " / ".join(result.keywords.get(c, [])[:3]) or f"cluster {c}"
            entry["representatives"] = [{"row": int(rows[i]), "text": texts[i]}
                                        for i in result.representatives.get(c, [])]
            if str(c) in per:
                entry["stability"] = per[str(c)]
        else:
            entry["label"] = "outliers"
        out.append(entry)
    return out


def cluster_corpus(corpus: Path | str, out_dir: Path | str, *, text_column: str = "response",
                   only_refused: bool = False, embedder: str | None = None,
                   config: ClusterConfig | None = None, stability_runs: int = 5,
                   progress: Callable[[str], None] | None = None, cache: bool = True) -> cluster_store.ClusterRun:
    """Cluster one corpus file into `out_dir`; returns the persisted run as it will be reloaded."""
    say = progress or (lambda _msg: None)
    corpus, out_dir = Path(corpus), Path(out_dir)
    config = config or ClusterConfig()
    read_rejects: list[dict] = []
    df = read_table(corpus, rejects=read_rejects)
    require_rows(df, corpus, rejected=len(read_rejects))
    sel = select_rows(df, corpus, text_column, only_refused)
    rejects = read_rejects + sel.rejects
    write_rejects(out_dir / cluster_store.ASSIGNMENTS, rejects)
    if not sel.texts:
        what = "refused rows with text" if only_refused else f"rows with a non-empty {text_column}"
        where = f"; see {out_dir / cluster_store.ASSIGNMENTS}.rejects.jsonl" if rejects else ""
        raise AtlasError(f"{corpus}: no {what} to cluster{where}")

    timings: dict[str, float] = {}
    emb = make_embedder(embedder, cache=cache, progress=progress is not None)
    say(f"embedding {len(sel.texts)} texts with {emb.model_name}")
    t = time.perf_counter()
    x = emb.encode(sel.texts)
    timings["embed_s"] = time.perf_counter() - t
    say(f"clustering ({len(config.seeds)} seeds)")
    t = time.perf_counter()
    result = ClusterPipeline(config).fit(x, sel.texts)
    timings["cluster_s"] = time.perf_counter() - t
    stability = None
    if stability_runs and result.method != "agglomerative-fallback" and len(sel.texts) > config.n_neighbors + 2:
        t = time.perf_counter()
        stability = stability_report(config, x, sel.texts, result.labels, n_seed_runs=stability_runs,
                                     n_resamples=stability_runs, progress=say)
        timings["stability_s"] = time.perf_counter() - t

    rows = np.asarray(sel.frame.index, dtype=np.int64)
    assignments = assignments_frame(sel, result)
    digest = file_sha256(corpus)
    run_id = sha256(
        f"{digest}|{text_column}|{only_refused}|{emb.key}|{sorted(config.to_dict().items())}".encode()
    ).hexdigest()[:12]
    meta = {
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": {"path": str(corpus), "sha256": digest, "rows": sel.n_input, "text_column": text_column,
                  "only_refused": only_refused, "clustered": len(sel.texts), "rejected": len(rejects),
                  "filtered_out": sel.n_input - len(sel.frame) - len(sel.rejects)},
        "embedder": emb.describe(),
        "config": config.to_dict(),
        "method": result.method,
        "n_clusters": result.n_clusters,
        "outlier_fraction": result.outlier_fraction,
        "reassigned_outliers": int(result.reassigned.sum()),
        "timings": {**timings, **{f"cluster.{k}": v for k, v in result.timings.items()}},
        "clusters": cluster_summaries(result, sel.texts, rows, stability),
    }
    if stability is not None:
        meta["stability"] = {"seed_pairwise_ari": stability["seeds"]["pairwise_ari"],
                             "resample_ari_vs_reference": stability["resamples"]["ari_vs_reference"]}
    cluster_store.save_run(out_dir, assignments, x, meta)
    if stability is not None:
        atomic_write_json(out_dir / cluster_store.STABILITY, stability, sort_keys=False)
    say("writing plots")
    if result.layout_2d is not None:
        plots.write_figure(plots.cluster_map(result.layout_2d, result.labels, sel.texts, result.keywords,
                                             title=f"clusters of {corpus.name} ({text_column})"),
                           out_dir / "map.html")
    plots.write_figure(plots.sizes_chart(result.sizes(), result.keywords), out_dir / "sizes.html")
    if stability is not None:
        plots.write_figure(plots.stability_chart(stability, result.keywords), out_dir / "stability.html")
    return cluster_store.load_run(out_dir)
