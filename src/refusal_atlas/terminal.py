"""Untrusted text on a terminal: control characters shown, never obeyed.

Labels, column names, file names, prompts, replies and model tokens reach the terminal in tables,
progress lines and one-line errors. A terminal obeys the control characters in them: ESC starts
sequences that clear the screen, move the cursor over earlier output, set the window title, make
hidden hyperlinks or write the clipboard (OSC 52); C1 codes do the same on some terminals; bidi
overrides reorder what is shown. So every such character is replaced by a visible stand-in of the
same length (the Unicode control pictures: ESC → ␛), keeping column widths and text spans intact.

Two places apply it: `SafeConsole` (every rich console here) cleans the text of what it renders but
not the escape codes rich itself writes for styles; `SafeStream` wraps sys.stdout / sys.stderr in the
CLI's entry point so plain `print` and third-party writes are cleaned too (carriage returns pass, for
progress bars). Rich consoles write to the stream beneath, so their own styling survives.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any, TextIO

from rich.console import Console, ConsoleOptions, RenderableType
from rich.segment import Segment
from rich.text import Text

__all__ = ["SafeConsole", "SafeStream", "one_line", "safe_console", "visible"]

_BIDI = (0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))


def _table(keep: str) -> dict[int, str]:
    table = {c: chr(0x2400 + c) for c in range(0x20) if chr(c) not in keep}
    table[0x7F] = "\u2421"
    table.update({c: "\ufffd" for c in range(0x80, 0xA0)})
    table.update({c: "\ufffd" for c in _BIDI})
    return table


_TEXT = _table("\n\t")
_STREAM = _table("\n\t\r")
_LINE = _table("\t") | {0x0A: "\u23ce"}


def visible(text: str) -> str:
    """`text` with every control character but newline and tab replaced by a visible stand-in."""
    return text.translate(_TEXT)


def one_line(text: str) -> str:
    """`visible`, with newlines shown as ⏎: for a value that must stay on its line (a cell, an error)."""
    return text.translate(_LINE)


class SafeConsole(Console):
    """A rich console whose rendered text shows control characters instead of sending them.

    Only text segments are cleaned; control segments (cursor moves of a live display) are rich's own.
    Writes go to the stream beneath a `SafeStream`, so the escape codes of rich's styles reach the terminal.
    """

    def render_str(self, text: str, **kwargs: Any) -> Text:
        # cleaned before rich measures it, so a cell's width counts the stand-ins (ESC has no width)
        return super().render_str(visible(text), **kwargs)

    def render(self, renderable: RenderableType, options: ConsoleOptions | None = None) -> Iterable[Segment]:
        for segment in super().render(renderable, options):
            if segment.control or segment.text.isprintable() or segment.text in ("\n", ""):
                yield segment
            else:
                yield Segment(visible(segment.text), segment.style, segment.control)

    @property
    def file(self) -> IO[str]:
        stream = super().file
        return stream.wrapped if isinstance(stream, SafeStream) else stream

    @file.setter
    def file(self, new_file: IO[str]) -> None:
        self._file = new_file


def safe_console(*, stderr: bool = False, **kwargs: Any) -> SafeConsole:
    """A `SafeConsole` (the arguments are rich `Console`'s)."""
    return SafeConsole(stderr=stderr, **kwargs)


class SafeStream:
    """A text stream that writes `visible` text (carriage returns kept) to the stream it wraps."""

    def __init__(self, wrapped: TextIO) -> None:
        self.wrapped = wrapped

    def write(self, text: str) -> int:
        self.wrapped.write(text.translate(_STREAM))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, buffer ... of the stream beneath
        return getattr(self.wrapped, name)


def guard_standard_streams() -> None:
    """Wrap sys.stdout and sys.stderr in `SafeStream`s (idempotent): for the command-line entry point."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SafeStream):
            setattr(sys, name, SafeStream(stream))
