"""Reading and writing the taxonomy's YAML files with line numbers and without data loss.

Everything here exists so that a user sees `path:line: message` for any problem in a file
(bad bytes, bad syntax, empty file) instead of a traceback, and so that edits keep the
file's comments, key order and indentation and never leave a half-written file.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.util import load_yaml_guess_indent


@dataclass(frozen=True, order=True)
class Problem:
    """One located problem; `str()` gives the `path:line: message` form the CLI prints."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def round_trip_yaml() -> YAML:
    """A round-trip (comment-keeping) YAML instance; it builds only plain data, never Python objects."""
    yaml = YAML(typ="rt", pure=True)
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long definitions
    return yaml


def decode_utf8(path: str, raw: bytes) -> tuple[str | None, Problem | None]:
    """Decode bytes as UTF-8; on failure name the line holding the first bad byte."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw[exc.start : exc.start + 1].hex()
        return None, Problem(
            path, line, f"not valid UTF-8 (byte 0x{bad} at offset {exc.start}); re-save the file as UTF-8"
        )
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, None


def parse_text(path: str, text: str) -> tuple[Any, Problem | None]:
    """Parse YAML text; a syntax error becomes a Problem at the parser's line (1-based)."""
    try:
        return round_trip_yaml().load(text), None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = exc.problem or exc.context or "invalid YAML"
        context = ""
        if exc.context and exc.problem:
            started = exc.context_mark.line + 1 if exc.context_mark is not None else None
            context = f" ({exc.context}" + (f" that starts at line {started})" if started not in (None, line)
                                            else ")")
        hint = "; check the indentation" if "block" in what else ""
        return None, Problem(path, line, f"YAML syntax error: {what}{context}{hint}")
    except YAMLError as exc:
        return None, Problem(path, 1, f"YAML error: {str(exc).splitlines()[0] if str(exc) else exc!r}")


def read_yaml(path: Path, display: str | None = None) -> tuple[Any, list[Problem]]:
    """Read one YAML file; returns (data, problems). An empty file is a problem, not `None` data."""
    shown = display or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [Problem(shown, 1, f"cannot read file: {exc.strerror or exc}")]
    text, problem = decode_utf8(shown, raw)
    if problem is not None:
        return None, [problem]
    assert text is not None
    data, problem = parse_text(shown, text)
    if problem is not None:
        return None, [problem]
    if data is None:
        return None, [Problem(shown, 1, "empty file: expected a top-level `nodes:` list (or `scheme:`); "
                                        "add content or delete the file")]
    return data, []


def key_line(mapping: Any, key: str, default: int = 1) -> int:
    """1-based line of `key` in a ruamel mapping (falls back to the mapping's own line)."""
    if isinstance(mapping, CommentedMap):
        try:
            return mapping.lc.key(key)[0] + 1
        except (KeyError, TypeError, AttributeError):
            return node_line(mapping, default)
    return default


def value_line(mapping: Any, key: str, default: int = 1) -> int:
    """1-based line of the value of `key` (where a wrong value actually sits)."""
    if isinstance(mapping, CommentedMap):
        try:
            return mapping.lc.value(key)[0] + 1
        except (KeyError, TypeError, AttributeError):
            return key_line(mapping, key, default)
    return default


def item_line(seq: Any, index: int, default: int = 1) -> int:
    """1-based line of item `index` of a ruamel sequence."""
    if isinstance(seq, CommentedSeq):
        try:
            return seq.lc.item(index)[0] + 1
        except (KeyError, TypeError, AttributeError, IndexError):
            return node_line(seq, default)
    return default


def node_line(obj: Any, default: int = 1) -> int:
    """1-based line where a ruamel mapping or sequence starts."""
    lc = getattr(obj, "lc", None)
    line = getattr(lc, "line", None)
    return line + 1 if isinstance(line, int) else default


def load_for_edit(path: Path) -> tuple[Any, YAML]:
    """Load a file for editing with a YAML instance set to the file's own indentation."""
    text = path.read_text(encoding="utf-8")
    _, indent, block_seq_indent = load_yaml_guess_indent(text)
    yaml = round_trip_yaml()
    # ruamel guesses the sequence indent and the dash offset; the mapping indent is the rest
    sequence = indent or 2
    offset = block_seq_indent or 0
    yaml.indent(mapping=max(sequence - offset, 1), sequence=sequence, offset=offset)
    return yaml.load(text), yaml


def dump_to_text(yaml: YAML, data: Any) -> str:
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder and `os.replace`.

    A crash or error at any point leaves either the old file or the new one, never a mix;
    the temporary file is removed on failure.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
