"""What the `directions` commands share: reading a prompt table, and the common options."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from refusal_atlas.errors import AtlasError

__all__ = ["REQUIRED_COLUMNS", "read_prompts"]

REQUIRED_COLUMNS = ("prompt", "node", "harmful")

ModelOpt = typer.Option("default", "--model",
                        help="model spec: 'default', a folder (e.g. ORGANISM/model), .gguf, hub id")
DirsOpt = typer.Option(..., "--directions", "-d", help="folder written by `directions extract`")
PromptsOpt = typer.Option(..., "--prompts", help="prompt table: prompt, node, harmful[, split, condition, category]")
OutOpt = typer.Option(..., "-o", "--out", help="output folder (the causal protocol's files, as `run` writes them)")
TaxOpt = typer.Option(None, "--taxonomy", "-t", help="taxonomy folder (maps nodes to ancestor directions)")
TokensOpt = typer.Option(None, "--refusal-tokens",
                         help="comma-separated refusal openers (first token of each); default: discovered from "
                              "the model's own refusals")


def read_prompts(path: Path) -> pd.DataFrame:
    """A prompt table (.parquet, .jsonl, .json, .csv) with at least `prompt`, `node`, `harmful`."""
    if not path.is_file():
        raise AtlasError(f"{path}: prompts file not found")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=path.suffix == ".jsonl")
        elif path.suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False)
        else:
            raise AtlasError(f"{path}: unsupported prompts format (use .parquet, .jsonl or .csv)")
    except AtlasError:
        raise
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: cannot read prompts ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise AtlasError(f"{path}: missing column(s) {', '.join(missing)}; expected prompt, node, harmful[, condition]")
    return df
