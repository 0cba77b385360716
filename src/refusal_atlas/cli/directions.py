"""CLI: `refusal-atlas directions ...` (thin layer over refusal_atlas.directions)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
