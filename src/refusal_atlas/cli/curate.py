"""CLI: `refusal-atlas curate ...` (thin layer over refusal_atlas.curate)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
