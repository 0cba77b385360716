"""Terminal output that never interprets untrusted text as markup.

Labels, definitions, ids, RDF literals, prompts and responses come from users and models; rich
would read `[/]` in them as markup (a crash) and `[link=URL]` as a hidden hyperlink. Every
console here has markup and emoji codes off, so any `str` handed to it (directly, as a table
cell, tree label or title) is printed literally; styling is added with `Text` objects only.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from refusal_atlas.terminal import safe_console

__all__ = ["RICH_MARKUP_MODE", "escape", "plain_console", "styled", "sub_app"]

# Typer option: help strings are printed literally (`[a-z0-9_.-]` stays visible), not as rich markup.
RICH_MARKUP_MODE = None


def plain_console(*, stderr: bool = False) -> Console:
    """A console that prints strings literally; piped output is 160 columns wide so ids are not squeezed."""
    console = safe_console(highlight=False, markup=False, emoji=False, stderr=stderr)
    if console.is_terminal:
        return console
    return safe_console(highlight=False, markup=False, emoji=False, stderr=stderr, width=160)


def styled(*parts: str | tuple[str, str]) -> Text:
    """`Text` from plain strings and (text, style) pairs; the text is never parsed as markup."""
    return Text.assemble(*parts)


def sub_app(help: str) -> typer.Typer:
    """A command group: no arguments shows its help, and help text is literal (untrusted-looking `[...]` stays)."""
    return typer.Typer(no_args_is_help=True, help=help, rich_markup_mode=RICH_MARKUP_MODE)
