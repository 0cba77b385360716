"""Control characters in untrusted text are shown, never sent to the terminal."""

from __future__ import annotations

import io

from rich.table import Table
from rich.text import Text

from refusal_atlas.terminal import SafeConsole, SafeStream, guard_standard_streams, one_line, visible

HOSTILE = "a\x1b]52;c;cHduZWQ=\x07b\x1b[2Jc\x9b31md\u202ee\x00f\x7fg"
OBEYED = ("\x1b", "\x9b", "\x07", "\u202e", "\x00", "\x7f")


def test_visible_replaces_every_control_character_one_for_one():
    shown = visible(HOSTILE + "\n\tend")
    assert len(shown) == len(HOSTILE) + 5
    assert not any(c in shown for c in OBEYED)
    assert shown.startswith("a\u241b]52;") and shown.endswith("\n\tend")


def test_one_line_keeps_a_value_on_its_line():
    assert one_line("resp\nonse\x1b") == "resp\u23ceonse\u241b"


def test_safe_console_cleans_cells_and_titles_but_keeps_its_own_styles():
    out = io.StringIO()
    console = SafeConsole(file=out, force_terminal=True, markup=False, highlight=False, width=80)
    table = Table(title=HOSTILE)
    table.add_column(HOSTILE)
    table.add_row(HOSTILE, Text(HOSTILE, style="bold"))
    console.print(table)
    console.print(HOSTILE, style="green")
    text = out.getvalue()
    assert "\x1b[1m" in text and "\x1b[32m" in text  # rich's styling still reaches the terminal
    stripped = text.replace("\x1b[1m", "").replace("\x1b[32m", "").replace("\x1b[3m", "").replace("\x1b[0m", "")
    assert not any(c in stripped for c in OBEYED), repr(stripped)
    assert "b\u241b[2Jc" in stripped  # shown in full: the stand-ins count in the column widths


def test_safe_stream_cleans_writes_but_keeps_carriage_returns_for_progress_bars():
    out = io.StringIO()
    stream = SafeStream(out)  # type: ignore[arg-type]
    print(f"\r{HOSTILE}", file=stream)  # type: ignore[arg-type]
    assert out.getvalue().startswith("\ra\u241b]52;") and not any(c in out.getvalue() for c in OBEYED)


def test_a_console_writes_beneath_the_guarded_stream(monkeypatch):
    raw = io.StringIO()
    monkeypatch.setattr("sys.stdout", raw)
    guard_standard_streams()
    guard_standard_streams()  # idempotent: one wrapper
    import sys

    assert isinstance(sys.stdout, SafeStream) and sys.stdout.wrapped is raw
    SafeConsole(force_terminal=True).print("x", style="bold")
    print("\x1b[2J")
    assert raw.getvalue() == "\x1b[1mx\x1b[0m\n\u241b[2J\n"
