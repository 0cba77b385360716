"""CLI: `refusal-atlas taxonomy ...` (thin layer over refusal_atlas.taxonomy)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
