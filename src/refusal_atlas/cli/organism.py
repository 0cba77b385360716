"""CLI: `refusal-atlas organism ...` (thin layer over refusal_atlas.organism)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
