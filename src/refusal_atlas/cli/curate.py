"""CLI: `refusal-atlas curate ...` — a thin layer over `refusal_atlas.curation`.

`prompts` builds a prompt table, `collect` generates responses (resumable), `detect` adds refusal
labels, `detect-eval` measures the detectors against pyrit's human labels, `sets` lists the prompt
sources. `cluster` and `map` come from `cli/curate_cluster.py`.
Inputs and outputs are CSV, JSONL or Parquet by extension; bad rows go to `<out>.rejects.jsonl`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from refusal_atlas.cli.console import sub_app
from refusal_atlas.cli.curate_cluster import register as _register_cluster
from refusal_atlas.cli.options import number
from refusal_atlas.curation.backends import GenerationSettings, make_backend
from refusal_atlas.curation.collect import collect
from refusal_atlas.curation.datasets import describe_sets, is_user_file, parse_column_mapping
from refusal_atlas.curation.detect import evaluate_detectors, get_detector, results_markdown
from refusal_atlas.curation.prompts import build_prompt_set
from refusal_atlas.curation.tables import (
    read_table,
    reject,
    rejects_path,
    require_columns,
    set_aside,
    table_format,
    write_rejects,
    write_table,
)
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write_text, check_not_same_file
from refusal_atlas.taxonomy.crosswalk import LOCAL_DIR, crosswalk_dir_for, load_crosswalks
from refusal_atlas.taxonomy.loader import load_taxonomy

app = sub_app("Prompt sets, response collection, refusal detection, clustering.")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def check_output(output: Path, *inputs: Path | str | None) -> None:
    """Neither the output nor its rejects file may be one of the inputs (writing would destroy it)."""

    check_not_same_file(output, *inputs)
    check_not_same_file(rejects_path(output), *inputs)


def _report_rejects(out: Path, rejects: list[dict]) -> None:

    path = write_rejects(out, rejects)
    if path is not None:
        _say(f"{len(rejects)} row(s) rejected: see {path}")


@app.command("sets")
def sets_cmd() -> None:
    """List the prompt sets `curate prompts --sets` accepts."""

    for name, desc in describe_sets().items():
        print(f"{name:14s} {desc}")
    print(f"{'taxonomy':14s} the taxonomy's own node examples")
    print(f"{'FILE':14s} a .jsonl/.csv/.parquet file (map columns with --column prompt=COL,category=COL)")


@app.command("prompts")
def prompts_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output table (.parquet, .jsonl or .csv).")],
    sets: Annotated[str, typer.Option(help="Comma-separated sets and/or prompt files.")] =
        "harmbench,strongreject,harmless,overrefusal,taxonomy",
    taxonomy: Annotated[Path | None, typer.Option("--taxonomy", "-t", help="Taxonomy folder (default: shipped).")]
        = None,
    crosswalks: Annotated[Path | None, typer.Option(
        help="Folder of *.sssom.tsv (default: the taxonomy's DIR/crosswalks/, else the shipped ones).")] = None,
    conditions: Annotated[bool, typer.Option("--conditions", help="Add condition-framed variants.")] = False,
    framings: Annotated[Path | None, typer.Option(help="Framings YAML (default: shipped).")] = None,
    framings_per_value: Annotated[int | None, typer.Option(min=1,
        help="Use at most N framings per condition context (seeded sample; default all).")] = None,
    max_per_node: Annotated[int | None, typer.Option(min=1, help="At most N base prompts per node (seeded).")] = None,
    column: Annotated[list[str] | None, typer.Option(
        "--column", help="For prompt files: FIELD=COLUMN (fields: prompt, category, node, harmful, split, "
                         "expected); repeat or comma-separate.")] = None,
    category_prefix: Annotated[str, typer.Option(
        help="For prompt files: the crosswalk prefix of their category values (e.g. strongreject); "
             "default: match any crosswalk label.")] = "user",
    seed: Annotated[int, typer.Option(min=0, help="Seed for sampling.")] = 0,
) -> None:
    """Build a prompt set mapped onto taxonomy nodes (optionally with condition variants)."""

    table_format(output)
    names = [s.strip() for s in sets.split(",") if s.strip()]
    if not names:
        raise AtlasError("--sets is empty; name at least one set (see `refusal-atlas curate sets`)")
    check_output(output, framings, *[n for n in names if is_user_file(n)])
    mapping = parse_column_mapping(column or [])
    options = {n: {"columns": mapping, "category_prefix": category_prefix} for n in names if is_user_file(n)}
    rejects: list[dict] = []
    warnings: list[str] = []
    folder = crosswalk_dir_for(taxonomy, crosswalks)
    if folder is None:
        warnings.append(f"the taxonomy {taxonomy} has no crosswalks folder ({taxonomy}/{LOCAL_DIR}/): external sets "
                        "are mapped with the shipped crosswalks, whose node ids must be this taxonomy's; pass "
                        "--crosswalks DIR")
    df = build_prompt_set(names, taxonomy=load_taxonomy(taxonomy), conditions=conditions, seed=seed,
                          max_per_node=max_per_node, crosswalks=load_crosswalks(folder), framings=framings,
                          framings_per_value=framings_per_value, set_options=options, rejects=rejects,
                          warnings=warnings)
    _report_rejects(output, rejects)
    if df.empty:
        raise AtlasError(f"{output}: no prompts" + (f"; all {len(rejects)} rows were rejected" if rejects else ""))
    write_table(df, output)
    for w in warnings:
        _say(f"warning: {w}")
    counts = ", ".join(f"{k} {v}" for k, v in df.groupby("source", sort=False).size().items())
    variants = int((df["condition"] != "").sum())
    _say(f"wrote {len(df)} prompts to {output} ({counts}; {variants} condition variants)")


@app.command("collect")
def collect_cmd(
    prompts: Annotated[Path, typer.Option("--prompts", "-p", help="Prompt table from `curate prompts`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Corpus table (.parquet recommended).")],
    model: Annotated[str, typer.Option(help="default | model folder | file.gguf | hub id.")] = "default",
    backend: Annotated[str, typer.Option(help="transformers | vllm.")] = "transformers",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per response.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 16,
    samples: Annotated[int, typer.Option(min=1, help="Responses per prompt (needs --sample when > 1).")] = 1,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(callback=number(0.0, above=True), help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(callback=number(0.0, 1.0, above=True), help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Sampling seed.")] = 0,
    system: Annotated[str | None, typer.Option(help="Optional system prompt.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts.")] = None,
    device: Annotated[str | None, typer.Option(help="torch device, e.g. cuda (default: CPU).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Discard an existing output / unfinished run.")] = False,
    threads: Annotated[int | None, typer.Option(min=1,
        help="torch CPU threads; 1 is much faster on a machine shared with other jobs.")] = None,
) -> None:
    """Generate responses with the model's chat template (resumable: rerun to continue)."""

    table_format(output)
    check_output(output, prompts)
    if limit is not None and limit < 0:
        raise AtlasError(f"--limit must be 0 or more (got {limit})")
    if threads is not None:
        if threads < 1:
            raise AtlasError(f"--threads must be at least 1 (got {threads})")

        torch.set_num_threads(threads)
    rejects: list[dict] = []
    table = read_table(prompts, rejects=rejects)
    if "prompt" not in table.columns:
        raise AtlasError(f"{prompts}: missing column prompt (found: {', '.join(map(str, table.columns)) or 'none'})")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=sample,
                                  temperature=temperature, top_p=top_p, seed=seed, system=system)
    kwargs = {"device": device, "progress": sys.stderr.isatty()} if backend == "transformers" else {}
    engine = make_backend(backend, model, **kwargs)
    try:
        corpus = collect(table, engine, output, settings=settings, n_samples=samples, limit=limit,
                         overwrite=overwrite, rejects=rejects, log=_say)
    finally:
        _report_rejects(output, rejects)
    _say(f"wrote {len(corpus)} responses to {output}")


@app.command("detect")
def detect_cmd(
    file: Annotated[Path, typer.Argument(help="Table with responses (.parquet, .jsonl or .csv).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output table (adds refused, refusal_score).")],
    text_column: Annotated[str, typer.Option(help="Column with the responses.")] = "response",
    prompt_column: Annotated[str | None, typer.Option(
        help="Column with the prompts (default: `prompt` when present).")] = None,
    detector: Annotated[str, typer.Option(help="embedding (default) | marker.")] = "embedding",
) -> None:
    """Label each response refused / not refused, with a score in [0, 1]."""

    table_format(output)
    check_output(output, file)
    det = get_detector(detector)
    rejects: list[dict] = []
    df = read_table(file, rejects=rejects)
    require_columns(df, [text_column], file, hint="name it with --text-column")
    if prompt_column is not None:
        require_columns(df, [prompt_column], file, hint="name it with --prompt-column")
    elif "prompt" in df.columns:
        prompt_column = "prompt"
    ok = []
    for rowno, rec in df.iterrows():
        text = rec[text_column]
        good = isinstance(text, str)
        if good and prompt_column is not None and not isinstance(rec[prompt_column], str):
            reject(rejects, source=file, row=rowno, reason=f"{prompt_column} is not text", record=rec)
            good = False
        elif not good:
            reject(rejects, source=file, row=rowno, reason=f"{text_column} is missing or not text", record=rec)
        ok.append(good)
    kept = df[ok].copy()
    _report_rejects(output, rejects)
    if kept.empty:
        raise AtlasError(f"{file}: no rows to label" + (f"; all {len(rejects)} were rejected" if rejects else ""))
    prompts = kept[prompt_column].tolist() if prompt_column else None
    refused, scores = det.predict(kept[text_column].tolist(), prompts)
    # labels already there (a human's `refused`, an earlier detector's score) are kept as input_<name>
    kept = set_aside(kept, ("refused", "refusal_score", "detector"))
    kept["refused"] = refused.astype(bool)
    kept["refusal_score"] = scores.astype(float)
    kept["detector"] = det.name
    write_table(kept, output)
    _say(f"wrote {len(kept)} rows to {output}: {int(refused.sum())} refused ({det.name} detector)")


@app.command("detect-eval")
def detect_eval_cmd(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write a Markdown table here.")] = None,
) -> None:
    """Precision / recall / F1 of each detector on pyrit's human-labelled refusal set (evaluation only)."""

    results = evaluate_detectors()
    text = results_markdown(results)
    if output is not None:
        atomic_write_text(output, text)
    print(text)


# `cluster` and `map` live in their own module (the clustering area) and are mounted here.

_register_cluster(app)
