"""`curate cluster` as a library call: read a corpus, embed, cluster, check stability, persist, plot.

The CLI is a thin layer over `cluster_corpus`; a notebook can call it the same way. The
output folder layout is documented in `cluster_store`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.curation import cluster_store, plots
from refusal_atlas.curation.cluster import OUTLIER, ClusterConfig, ClusterPipeline, ClusterResult, ctfidf_keywords
from refusal_atlas.curation.cluster_describe import cluster_name
from refusal_atlas.curation.cluster_levels import empty_warnings, tree_summary
from refusal_atlas.curation.embed import make_embedder
from refusal_atlas.curation.net_of import net_of
from refusal_atlas.curation.stability import stability_report
from refusal_atlas.curation.tables import (
    read_table,
    reject,
    require_columns,
    require_rows,
    set_aside,
    write_rejects,
)
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256, sha256
from refusal_atlas.io import atomic_write_json

log = logging.getLogger(__name__)

# corpus columns with a fixed meaning downstream (mapping, proposals): normalised when carried
LIST_COLUMNS = ("nodes",)
BOOL_COLUMNS = ("harmful", "refused")
STRING_COLUMNS = ("prompt_id", "node", "source", "external_category", "condition", "model_id", "prompt")
# columns the pipeline writes; an input column of the same name is carried as `input_<name>` (`input_` repeated
# until the name is free)
OWN_COLUMNS = ("row", "text", "label_text", "cluster", "confidence", "reassigned", "fitted", "x", "y")
LEVEL_PREFIX = "cluster_level_"


@dataclass
class Selected:
    """The corpus rows that will be clustered, with their 0-based input positions (`frame.index`)."""

    frame: pd.DataFrame
    texts: list[str]
    rejects: list[dict]
    n_input: int
    label_texts: list[str] | None = None
    net_texts: list[str] | None = None  # the column the texts are made net of (`net_of`), row-aligned


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    try:
        return bool(value) and not pd.isna(value)
    except (TypeError, ValueError):
        return bool(value)


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def select_rows(df: pd.DataFrame, path: Path | str, text_column: str, only_refused: bool,
                label_column: str | None = None, net_column: str | None = None) -> Selected:
    """Rows to cluster; empty and non-text cells go to rejects with their row number (never dropped silently).

    Rows left out by --only-refused are a filter the user asked for, not rejects; their count is
    recorded in clusters.json. The result's index is the 0-based input position (`row`).
    """
    require_columns(df, [text_column], path, hint="choose the text with --text response|prompt")
    if label_column:
        require_columns(df, [label_column], path, hint="--label-by names the column that describes the clusters")
    if net_column:
        require_columns(df, [net_column], path, hint="--net-of names the column whose content is taken out "
                                                     "(e.g. prompt), or none")
    rejects: list[dict] = []
    n_input = len(df)
    if only_refused:
        require_columns(df, ["refused"], path, hint="run `refusal-atlas curate detect` first")
        df = df[df["refused"].map(_truthy)]
    keep = []
    for row, value in zip(df.index, df[text_column], strict=True):
        if not _text(value).strip():
            reject(rejects, source=path, row=int(row), reason=f"empty {text_column}", record=df.loc[row])
        elif not isinstance(value, str):  # a JSON number, list or object is not a text to embed (as `detect`)
            reject(rejects, source=path, row=int(row), reason=f"{text_column} is not text ({type(value).__name__})",
                   record=df.loc[row])
        elif net_column and not _text(df.at[row, net_column]).strip():
            reject(rejects, source=path, row=int(row), reason=f"empty {net_column} (the clustered text is made net "
                   f"of it: --net-of {net_column})", record=df.loc[row])
        else:
            keep.append(row)
    selected = df.loc[keep].copy()
    # the readers number rows from 1 (Parquet position, CSV data row, JSONL line): `row` is 0-based
    selected.index = pd.Index(np.asarray(selected.index, dtype=np.int64) - 1, name="row")
    labels = [_text(v) for v in selected[label_column]] if label_column else None
    net = [_text(v) for v in selected[net_column]] if net_column else None
    return Selected(selected, [str(v) for v in selected[text_column]], rejects, n_input, labels, net)


def replies_config(n_rows: int, seeds: tuple[int, ...] | None = None, **overrides: Any) -> ClusterConfig:
    """How replies are clustered by default: a refusal wording is often a handful of verbatim repeats, so small
    clusters are allowed (min_cluster_size max(3, rows / 40)) and a reply repeated twice is a leaf of its own.
    At `ClusterConfig`'s 10, the default run's 106 refusals gave 1 cluster and 40 % outliers where they say 4
    planted wordings (docs/decisions.md, "Replies at the defaults")."""
    base = ClusterConfig() if seeds is None else ClusterConfig(seeds=seeds)
    return replace(base, min_cluster_size=max(3, n_rows // 40), verbatim_min=2, **overrides)


def resolve_net_of(choice: str | None, text_column: str, columns: Any) -> str | None:
    """`auto`: replies (`response`) are made net of their `prompt` where the table has one; `none`: never."""
    if choice is None or choice.lower() == "none" or choice == text_column:
        return None
    if choice.lower() == "auto":
        return "prompt" if text_column == "response" and "prompt" in set(map(str, columns)) else None
    return choice


def id_column(df: pd.DataFrame) -> str | None:
    """The input's own row id: `id`, then the first column named `*_id` / `*ID` whose values are unique."""
    names = [c for c in df.columns if str(c).lower() == "id"]
    names += [c for c in df.columns if str(c).lower().endswith("_id") or str(c).endswith("ID")]
    for name in names:
        values = df[name]
        if values.notna().all() and values.astype(str).is_unique:
            return str(name)
    return None


def _carry(values: list[Any], column: str) -> list[Any]:
    """Parquet-safe copies of an input column (mixed or nested values become JSON text)."""
    if column in LIST_COLUMNS:
        return [list(v) if isinstance(v, list | tuple | np.ndarray) else [] for v in values]
    if column in BOOL_COLUMNS:
        return [_truthy(v) for v in values]
    if column in STRING_COLUMNS:
        return [_text(v) for v in values]
    kinds = {type(v) for v in values if not (v is None or (isinstance(v, float) and np.isnan(v)))}
    if kinds <= {str} or (len(kinds) == 1 and kinds <= {int, float, bool, np.int64, np.float64, np.bool_}):
        return values
    return [None if v is None else json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=str)
            for v in values]


def assignments_frame(sel: Selected, result: ClusterResult, text_column: str) -> pd.DataFrame:
    """The persisted table (see cluster_store): row ids, text, flat cluster, every level, and the input's columns."""
    out = pd.DataFrame({"row": np.asarray(sel.frame.index, dtype=np.int64), "text": sel.texts})
    if sel.label_texts is not None:
        out["label_text"] = sel.label_texts
    out["cluster"] = result.labels
    for i, lab in enumerate(result.levels):
        out[f"{LEVEL_PREFIX}{i}"] = lab
    out["confidence"], out["reassigned"], out["fitted"] = result.confidence, result.reassigned, result.fitted
    if result.layout_2d is not None:
        out["x"], out["y"] = result.layout_2d[:, 0], result.layout_2d[:, 1]
    inputs = sel.frame.drop(columns=[text_column], errors="ignore")
    carried = set_aside(inputs, lambda name: name in OWN_COLUMNS or name.startswith(LEVEL_PREFIX), taken=out.columns)
    for col, name in zip(inputs.columns, carried.columns, strict=True):
        out[str(name)] = _carry(inputs[col].tolist(), str(col))
    return out


def cluster_summaries(result: ClusterResult, texts: list[str], rows: np.ndarray,
                      stability: dict | None) -> list[dict]:
    per = (stability or {}).get("per_cluster", {})
    out = []
    sizes = result.sizes()
    for c in sorted(sizes, key=lambda c: (c == OUTLIER, c)):
        entry: dict[str, Any] = {"id": c, "size": sizes[c], "keywords": result.keywords.get(c, [])}
        if c != OUTLIER:
            entry["label"] = cluster_name(result.keywords.get(c, [])) or f"cluster {c}"
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
                   config: ClusterConfig | Callable[[int], ClusterConfig] | None = None, stability_runs: int = 5,
                   progress: Callable[[str], None] | None = None, cache: bool = True,
                   label_column: str | None = None, net_of_column: str | None = None) -> cluster_store.ClusterRun:
    """Cluster one corpus file into `out_dir`; returns the persisted run as it will be reloaded.

    `label_column` (default: the text column) is the text that names the clusters (keywords,
    representatives): cluster refusals by their wording, describe them by the prompts that drew them.
    `net_of_column` clusters the texts net of another column's content (`net_of`: replies grouped by how
    they are worded rather than by the request they echo); `embeddings.npy` then holds those residuals.
    "auto" takes replies net of their prompts where there are both (`resolve_net_of`); None or "none": off.
    `config` may be a function of the number of rows to cluster (e.g. `replies_config`), called once they are known.
    """
    say = progress or (lambda _msg: None)
    corpus, out_dir = Path(corpus), Path(out_dir)
    chosen = config
    label_column = label_column if label_column and label_column != text_column else None
    read_rejects: list[dict] = []
    df = read_table(corpus, rejects=read_rejects)
    require_rows(df, corpus, rejected=len(read_rejects))
    net_of_column = resolve_net_of(net_of_column, text_column, df.columns)
    sel = select_rows(df, corpus, text_column, only_refused, label_column, net_of_column)
    config = (chosen(len(sel.texts)) if callable(chosen) else chosen) or ClusterConfig()
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
    net_record = None
    if net_of_column and sel.net_texts is not None:
        say(f"embedding {len(sel.net_texts)} {net_of_column!r} texts to take their content out")
        made = net_of(x, emb.encode(sel.net_texts), seed=config.seeds[0] if config.seeds else 0)
        x, net_record = made.vectors, made.describe(net_of_column)
        say(f"{net_of_column!r} explains {made.explained:.0%} of the {text_column!r} vectors' variance; clustering "
            "the rest")
    timings["embed_s"] = time.perf_counter() - t
    say(f"clustering ({len(config.seeds)} seeds)")
    t = time.perf_counter()
    label_texts = sel.label_texts if sel.label_texts is not None else sel.texts
    result = ClusterPipeline(config).fit(x, sel.texts)
    if sel.label_texts is not None:
        result.keywords = ctfidf_keywords(label_texts, result.labels, config.n_keywords)
    timings["cluster_s"] = time.perf_counter() - t
    stability = None
    if (stability_runs and result.method == "consensus-umap-hdbscan" and result.n_clusters
            and len(sel.texts) > config.n_neighbors + 2):
        t = time.perf_counter()
        stability = stability_report(config, x, sel.texts, result.labels, n_seed_runs=stability_runs,
                                     n_resamples=stability_runs, progress=say, level_counts=result.level_counts)
        timings["stability_s"] = time.perf_counter() - t
    warnings = empty_warnings(result, config, x, sel.texts, stability)
    for line in warnings:
        log.warning("%s", line)

    rows = np.asarray(sel.frame.index, dtype=np.int64)
    assignments = assignments_frame(sel, result, text_column)
    digest = file_sha256(corpus)
    run_id = sha256(
        f"{digest}|{text_column}|{label_column}|{only_refused}|{emb.key}|{sorted(config.to_dict().items())}"
        f"{f'|net_of={net_of_column}' if net_of_column else ''}".encode()
    ).hexdigest()[:12]
    meta = {
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": {"path": str(corpus), "sha256": digest, "rows": sel.n_input, "text_column": text_column,
                  "label_column": label_column or text_column, "id_column": id_column(df),
                  "row": "0-based position of the row in the input table",
                  "only_refused": only_refused, "clustered": len(sel.texts), "rejected": len(rejects),
                  "filtered_out": sel.n_input - len(sel.frame) - len(sel.rejects)},
        "embedder": emb.describe(),
        "net_of": net_record,
        "config": config.to_dict(),
        "method": result.method,
        "n_clusters": result.n_clusters,
        "outlier_fraction": result.outlier_fraction,
        "reassigned_outliers": int(result.reassigned.sum()),
        "warnings": warnings,
        "timings": {**timings, **{f"cluster.{k}": v for k, v in result.timings.items()}},
        "tree": tree_summary(result, label_texts, stability, config.n_keywords),
        "clusters": cluster_summaries(result, label_texts, rows, stability),
    }
    if stability is not None:
        meta["stability"] = {"seed_pairwise_ari": stability["seeds"]["pairwise_ari"],
                             "resample_ari_vs_reference": stability["resamples"]["ari_vs_reference"]}
    cluster_store.save_run(out_dir, assignments, x, meta)
    (out_dir / cluster_store.STABILITY).unlink(missing_ok=True)  # never leave a previous run's figures
    if stability is not None:
        atomic_write_json(out_dir / cluster_store.STABILITY, stability, sort_keys=False)
    say("writing plots")
    if result.layout_2d is not None:
        plots.write_figure(plots.cluster_map(result.layout_2d, result.labels, label_texts, result.keywords,
                                             title=f"clusters of {corpus.name} ({text_column})"),
                           out_dir / "map.html")
    plots.write_figure(plots.sizes_chart(result.sizes(), result.keywords), out_dir / "sizes.html")
    if stability is not None:
        plots.write_figure(plots.stability_chart(stability, result.keywords), out_dir / "stability.html")
    return cluster_store.load_run(out_dir)
