"""CLI: `refusal-atlas run` and `refusal-atlas query ...`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach `run` and the `query` group to the main app."""
    query_app = typer.Typer(no_args_is_help=True)
    app.add_typer(query_app, name="query", help="Ask the atlas which directions correspond to which harm sources.")
