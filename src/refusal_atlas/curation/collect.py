"""Response collection: run a prompt table through a model, resumably, with provenance per row.

Each finished chunk of generations is written at once to `<out>.partial/part-NNNNN.parquet`
(atomically), so a killed run loses at most the chunk in flight. On restart the (prompt_id,
sample) pairs already in the part files, or in an existing output made with the same model and
settings, are skipped: finished rows are never regenerated. When all rows are done the parts are
joined into `<out>` (atomically) and the part folder is removed. `<out>.partial/run.json` holds
the model and settings of the run, and a restart with different ones is refused instead of
mixing two runs in one corpus.

Every row carries `model_id`, `model_revision` (commit, weights-file sha256 or content hash),
`generation` (JSON of the settings that determine the output), `seed`, `created_at` (UTC, ISO
8601) and `content_hash` (sha256 of the prompt, response and all of the above).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from refusal_atlas.curation.backends import GenerationBackend, GenerationSettings
from refusal_atlas.curation.datasets import EXTRA_COLUMNS, PROMPT_COLUMNS
from refusal_atlas.curation.prompts import make_prompt_id
from refusal_atlas.curation.tables import read_table, reject, set_aside, table_format, write_table
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import text_sha256
from refusal_atlas.io import atomic_write, atomic_write_json, read_json_file

CORPUS_COLUMNS = ("response", "sample", "model_id", "model_revision", "generation", "seed", "created_at",
                  "content_hash")
_DEFAULTS = {"base_prompt": None, "source": "user", "split": "", "external_category": "", "nodes": None,
             "node": "", "harmful": True, "condition": "", "expected": ""}


def partial_dir(out: Path | str) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def prepare_prompts(prompts: pd.DataFrame, *, source: str | Path = "prompts",
                    rejects: list[dict] | None = None) -> pd.DataFrame:
    """Validate a prompt table for collection: a non-empty text `prompt`, a unique `prompt_id`
    (computed when absent), and the contract columns (defaults for a bare user file). Bad rows go to
    `rejects` with their row number."""

    if "prompt" not in prompts.columns:
        raise AtlasError(f"{source}: missing column prompt (found: {', '.join(map(str, prompts.columns)) or 'none'})")
    df = prompts.copy()
    ok = []
    seen: dict[str, object] = {}
    for rowno, rec in df.iterrows():
        text = rec["prompt"]
        if not isinstance(text, str) or not text.strip():
            reject(rejects, source=source, row=_row_number(rowno), reason="empty or non-text prompt",
                   record=rec)
            ok.append(False)
            continue
        pid = rec.get("prompt_id")
        if not isinstance(pid, str) or not pid:
            pid = make_prompt_id(str(rec.get("source") or "user"), str(rec.get("base_prompt") or text),
                                 str(rec.get("condition") or ""), str(rec.get("framing") or ""))
            if pid in seen:  # same text twice in a bare file: keep both, distinguish by row
                pid = make_prompt_id("user", text, "", f"row {rowno}")
            df.at[rowno, "prompt_id"] = pid
        if pid in seen:
            reject(rejects, source=source, row=_row_number(rowno), reason=f"duplicate prompt_id {pid} "
                   f"(first at row {seen[pid]})", record=rec)
            ok.append(False)
            continue
        seen[pid] = _row_number(rowno)
        ok.append(True)
    df = df[ok].copy()
    for col, default in _DEFAULTS.items():
        if col not in df.columns:
            if col == "base_prompt":
                df[col] = df["prompt"]
            elif col == "nodes":
                df[col] = [[n] if isinstance(n, str) and n else [] for n in df.get("node", [""] * len(df))]
            else:
                df[col] = default
    return df


def _row_number(index_value: object) -> object:
    return int(index_value) if isinstance(index_value, int) else str(index_value)


def _content_hash(row: dict) -> str:
    keys = ("prompt_id", "sample", "prompt", "response", "model_id", "model_revision", "generation", "seed")
    payload = json.dumps({k: row[k] for k in keys}, sort_keys=True, ensure_ascii=False, default=str)
    return text_sha256(payload)


def _write_parquet(batch: pd.DataFrame, tmp: Path) -> None:
    batch.to_parquet(tmp, index=False)


def _read_parts(folder: Path) -> pd.DataFrame:
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame()
    frames = []
    for part in parts:
        try:
            frames.append(pd.read_parquet(part))
        except (OSError, ValueError) as exc:  # pyarrow's errors on a damaged file derive from these
            raise AtlasError(f"{part}: damaged part of an unfinished run ({str(exc)[:120]}); delete this file "
                             "and rerun the same command (its rows are generated again)") from exc
    return pd.concat(frames, ignore_index=True)


def _run_key(backend: GenerationBackend, settings: GenerationSettings) -> dict:
    prov = backend.provenance()
    return {"model_id": str(prov.get("model_id", "")), "model_revision": str(prov.get("model_revision", "")),
            "backend": getattr(backend, "name", "unknown"),
            "generation": json.dumps(settings.output_settings(), sort_keys=True)}


def collect(
    prompts: pd.DataFrame,
    backend: GenerationBackend,
    out_path: Path | str,
    *,
    settings: GenerationSettings | None = None,
    n_samples: int = 1,
    limit: int | None = None,
    overwrite: bool = False,
    on_batch: Callable[[pd.DataFrame], None] | None = None,
    rejects: list[dict] | None = None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Generate `n_samples` responses per prompt into `out_path` (resumable); return the corpus.

    `on_batch(rows)` runs after each chunk is safely on disk (progress hooks; tests use it to
    interrupt a run). `overwrite=True` discards an existing output and partial run first.
    """
    settings = settings or GenerationSettings()
    out_path = Path(out_path)
    table_format(out_path)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if n_samples < 1:
        raise AtlasError(f"--samples must be at least 1 (got {n_samples})")
    if n_samples > 1 and not settings.do_sample:
        raise AtlasError("--samples > 1 with greedy decoding would repeat the same response; add --sample")
    if limit is not None and limit < 0:
        raise AtlasError(f"--limit must be 0 or more (got {limit})")
    # a prompt set's own `response` (a reference answer, say) or `seed` is kept as input_<name>, not overwritten
    df = set_aside(prepare_prompts(prompts, rejects=rejects), CORPUS_COLUMNS)
    if limit is not None:
        df = df.head(limit)
    if df.empty:
        raise AtlasError("no prompts to collect (all rejected or empty input)")

    key = _run_key(backend, settings)
    part_dir = partial_dir(out_path)
    if overwrite:
        shutil.rmtree(part_dir, ignore_errors=True)
        out_path.unlink(missing_ok=True)
    run_file = part_dir / "run.json"
    if run_file.is_file():
        previous = read_json_file(run_file, f"delete {part_dir} (its finished parts are kept only with a valid "
                                            "run.json) or pass --overwrite")
        if not isinstance(previous, dict):
            previous = {}
        if previous != key:
            raise AtlasError(f"{part_dir}: an unfinished run with a different model or settings is there "
                             f"({previous.get('model_id')}, {previous.get('generation')}); rerun with the same "
                             "options, delete the folder, or pass --overwrite")
    done = [_read_parts(part_dir)] if part_dir.is_dir() else []
    if out_path.is_file():
        existing = read_table(out_path)
        if len(existing):
            same = (existing.get("model_id", pd.Series(dtype=str)).astype(str) == key["model_id"]) & \
                   (existing.get("model_revision", pd.Series(dtype=str)).astype(str) == key["model_revision"]) & \
                   (existing.get("generation", pd.Series(dtype=str)).astype(str) == key["generation"])
            if not bool(same.all()):
                raise AtlasError(f"{out_path}: exists with responses from another model or settings; "
                                 "choose another -o or pass --overwrite")
            done.append(existing.reset_index(drop=True))
    done_df = pd.concat([d for d in done if len(d)], ignore_index=True) if any(len(d) for d in done) \
        else pd.DataFrame(columns=["prompt_id", "sample"])
    done_keys = set(zip(done_df["prompt_id"].astype(str), done_df["sample"].astype(int), strict=True))

    records = df.to_dict("records")
    items = [(i, s) for s in range(n_samples) for i in range(len(records))
             if (records[i]["prompt_id"], s) not in done_keys]
    total = len(records) * n_samples
    if done_keys:
        log(f"resuming: {total - len(items)} of {total} rows already done, {len(items)} to generate")
    if items:
        part_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, key, indent=1, sort_keys=False)
        existing_parts = sorted(part_dir.glob("part-*.parquet"))
        next_part = int(existing_parts[-1].stem.split("-")[1]) + 1 if existing_parts else 0
        instructions = [records[i]["prompt"] for i, _ in items]
        for idx, responses in backend.generate(instructions, settings):
            now = datetime.now(UTC).isoformat(timespec="seconds")
            rows = []
            for j, response in zip(idx, responses, strict=True):
                i, sample = items[j]
                row = {**records[i], "response": response, "sample": sample, "model_id": key["model_id"],
                       "model_revision": key["model_revision"], "generation": key["generation"],
                       "seed": settings.seed, "created_at": now}
                row["content_hash"] = _content_hash(row)
                rows.append(row)
            batch = pd.DataFrame(rows)
            target = part_dir / f"part-{next_part:05d}.parquet"
            atomic_write(target, functools.partial(_write_parquet, batch))
            next_part += 1
            if on_batch is not None:
                on_batch(batch)
        done_df = pd.concat([done_df, _read_parts(part_dir)], ignore_index=True) if len(done_df) \
            else _read_parts(part_dir)

    corpus = _assemble(done_df, df, n_samples)
    others = int((~corpus["prompt_id"].isin(set(df["prompt_id"]))).sum())
    if others:
        log(f"{out_path}: kept {others} row(s) from an earlier run whose prompts are not in this prompt set")
    write_table(corpus, out_path)
    shutil.rmtree(part_dir, ignore_errors=True)
    return corpus


def _assemble(done: pd.DataFrame, prompts: pd.DataFrame, n_samples: int) -> pd.DataFrame:
    """One row per (prompt, sample) in prompt order; rows from earlier runs of other prompts kept."""
    done = done.drop_duplicates(subset=["prompt_id", "sample"], keep="first").copy()
    done["sample"] = done["sample"].astype(int)
    order = {pid: k for k, pid in enumerate(prompts["prompt_id"])}
    done["_order"] = done["prompt_id"].map(lambda p: order.get(p, len(order)))
    done = done.sort_values(["_order", "sample"], kind="stable").drop(columns="_order")
    lead = [c for c in (*PROMPT_COLUMNS, *CORPUS_COLUMNS) if c in done.columns]
    rest = [c for c in done.columns if c not in lead and c not in EXTRA_COLUMNS] + \
        [c for c in EXTRA_COLUMNS if c in done.columns]
    return done[lead + rest].reset_index(drop=True)
