"""What the `directions` commands share: reading a prompt table, and the common options."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from refusal_atlas.curation.tables import read_table
from refusal_atlas.errors import AtlasError

__all__ = ["REQUIRED_COLUMNS", "parse_bool", "read_prompts"]

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


def parse_bool(value: object) -> bool | None:
    """true/false, yes/no, 1/0 (any case) or a real bool; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text)


def read_prompts(path: Path, *, parse_flags: bool = True) -> pd.DataFrame:
    """A prompt table (.parquet, .jsonl, .json, .csv) with at least `prompt`, `node`, `harmful`.

    CSV and JSONL go through the curation reader (its quoting and row rules); a malformed row is an error
    naming it, since these commands have no output beside which to keep rejects. `harmful` comes back as
    real booleans: the commands mask rows with it, and "no" or "false" read as text would count as true; a value
    that is none of true/false, yes/no, 1/0 is an error. `parse_flags=False` leaves the column as read, for a
    caller that rejects such rows one by one (`directions extract` writes them to its rejects file)."""
    if not path.is_file():
        raise AtlasError(f"{path}: prompts file not found")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.suffix == ".json":
            df = pd.read_json(path)
        elif path.suffix in (".jsonl", ".csv"):
            rejects: list[dict] = []
            df = read_table(path, rejects=rejects).reset_index(drop=True)
            if rejects:
                first = rejects[0]
                raise AtlasError(f"{path}: row {first['row']}: {first['reason']} ({len(rejects)} malformed row(s)); "
                                 "fix them and run again")
        else:
            raise AtlasError(f"{path}: unsupported prompts format (use .parquet, .jsonl or .csv)")
    except AtlasError:
        raise
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: cannot read prompts ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise AtlasError(f"{path}: missing column(s) {', '.join(missing)}; expected prompt, node, harmful[, condition]")
    if not parse_flags:
        return df
    parsed = df["harmful"].map(parse_bool)
    bad = parsed.isna()
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise AtlasError(f"{path}: row {i + 1}: harmful is {df['harmful'].iloc[i]!r}; write true/false, yes/no or 1/0 "
                         f"({int(bad.sum())} such row(s))")
    df["harmful"] = parsed.astype(bool)
    df["node"] = df["node"].map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v))
    return df
