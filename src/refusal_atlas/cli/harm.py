"""CLI: `refusal-atlas harm …` — harmfulness vs refusal per node (the 2×2, jailbreaks, verdicts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
import typer
from rich.table import Table
from rich.text import Text

from refusal_atlas.atlas.harm_rows import direction_capture
from refusal_atlas.atlas.harm_stage import HarmSettings, harm_table, run_harm_stage
from refusal_atlas.atlas.pipeline import evaluation_rows
from refusal_atlas.atlas.runconfig import organism_trained
from refusal_atlas.cli.console import sub_app
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import check_not_same_file
from refusal_atlas.lm.models import auto_threads, load_model
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.terminal import safe_console

if TYPE_CHECKING:  # pandas loads only when a command runs (a fast `--help`)
    import pandas as pd

app = sub_app("Harmfulness vs refusal per harm source: the 2×2, jailbreaks, verdicts.")


@app.command()
def analyse(
    run_dir: Path = typer.Argument(..., help="a folder written by `refusal-atlas run` (corpus, prompts)"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder (the stage writes OUT/harm/)"),
    model: str | None = typer.Option(None, "--model", help="model spec; default: RUN_DIR/organism/model if present, "
                                                             "else 'default'"),
    taxonomy: Path | None = typer.Option(None, "--taxonomy", "-t", help="taxonomy folder (default: the shipped one)"),
    seed: int = typer.Option(0, "--seed", min=0),
    extra_per_node: int = typer.Option(16, "--extra-per-node", min=0,
                                       help="unlabelled held-out prompts under loosening conditions added per branch"),
    quick: bool = typer.Option(False, "--quick", help="small budgets (smoke tests)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: auto by load)"),
) -> None:
    """Build the four cells per node, both directions with floors, projections, causal checks and verdicts."""


    check_not_same_file(out / "harm", run_dir)
    spec = model or (str(run_dir / "organism" / "model") if (run_dir / "organism" / "model").is_dir() else "default")
    torch.set_num_threads(threads or auto_threads())
    table = run_table(run_dir, extra_per_node=extra_per_node, seed=seed)
    settings = HarmSettings.quick() if quick else HarmSettings()
    lm = load_model(spec)
    reuse = direction_capture(run_dir, lm, exclude=organism_trained(run_dir))
    summary = run_harm_stage(out, lm, table, load_taxonomy(taxonomy), seed, settings=settings, reuse=reuse,
                             progress=True, console=safe_console(stderr=True))
    _print(out)
    typer.echo(f"wrote {out / 'harm'} in {summary['seconds']:.0f} s")


@app.command()
def show(out: Path = typer.Argument(..., help="the folder given to `harm analyse -o`")) -> None:
    """Print the 2×2 table per node and each node's verdict sentence."""
    _print(out)


def _print(out: Path) -> None:

    folder = out / "harm"
    if not (folder / "cells.csv").is_file():
        raise AtlasError(f"{folder}: no harm analysis here; run `refusal-atlas harm analyse RUN_DIR -o {out}`")
    cells = pd.read_csv(folder / "cells.csv", keep_default_na=False)
    table = Table(title="harmfulness × refusal: n per cell (HR harmful×refused, HC harmful×complied, "
                        "LR harmless×refused, LC harmless×complied; harmless cells are pooled)")
    for col in ("node", "n_HR", "n_HC", "n_LR", "n_LC", "too_small", "design"):
        table.add_column(col)
    for rec in cells.to_dict("records"):
        table.add_row(*(Text(str(rec.get(c, ""))) for c in ("node", "n_HR", "n_HC", "n_LR", "n_LC", "too_small",
                                                             "design")))
    console = safe_console()
    console.print(table)
    try:
        findings = json.loads((folder / "findings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{folder / 'findings.json'}: unreadable ({exc}); rerun `harm analyse`") from exc
    for f in findings:
        console.print(Text(f"[{f['verdict']}] {f['sentence']}"))


def run_table(run_dir: Path, *, extra_per_node: int = 16, extra_harmless: int = 12, max_chars: int = 320,
              seed: int = 0) -> pd.DataFrame:
    """The labelled corpus of a `run` folder plus unlabelled held-out rows from its prompt table (harmful
    requests under loosening conditions, a few plain and refusing-condition ones per branch, over-refusal
    probes, harmless requests) so that the four cells have prompts to read; the stage labels the added rows
    itself. Rows the organism trained on are left out."""


    run_dir = Path(run_dir)
    for name in ("corpus.parquet", "prompts.parquet"):
        if not (run_dir / name).is_file():
            raise AtlasError(f"{run_dir / name}: missing; run `refusal-atlas run -o {run_dir}` first")
    corpus = pd.read_parquet(run_dir / "corpus.parquet")
    prompts = pd.read_parquet(run_dir / "prompts.parquet")
    prompts = prompts[prompts["prompt"].str.len() <= max_chars]
    return harm_table(corpus, evaluation_rows(prompts, run_dir), loosening_per_node=extra_per_node,
                      extra_harmless=extra_harmless, seed=seed)
