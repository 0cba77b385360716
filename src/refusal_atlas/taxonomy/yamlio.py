"""Reading and writing the taxonomy's YAML files with line numbers and without data loss.

Everything here exists so that a user sees `path:line: message` for any problem in a file
(bad bytes, bad syntax, empty file) instead of a traceback, and so that edits keep the
file's comments, key order and indentation and never leave a half-written file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.util import load_yaml_guess_indent

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import brief, write_text_like

# The most values (scalars + containers, aliases counted at every use) one file may expand to.
# A large real taxonomy has tens of thousands; an alias bomb of a few lines has billions, and
# every later check (and any error message) would walk them all.
MAX_EXPANDED_VALUES = 1_000_000


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
        return None, Problem(path, 1, f"YAML error: {brief(str(exc).splitlines()[0] if str(exc) else exc)}")


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
    problem = alias_bomb_problem(shown, data)
    if problem is not None:
        return None, [problem]
    if data is None:
        return None, [Problem(shown, 1, "empty file: expected a top-level `nodes:` list (or `scheme:`); "
                                        "add content or delete the file")]
    return data, []


def expanded_size(data: Any, limit: int = MAX_EXPANDED_VALUES) -> int:
    """How many values `data` holds with aliases expanded, counting up to just past `limit`.

    Shared (aliased) containers are sized once and their size reused, so the count itself
    costs one visit per distinct container; a cycle (a recursive alias) counts as over the limit.
    """
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(obj: Any) -> int:
        if not isinstance(obj, dict | list):
            return 1
        key = id(obj)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            return limit + 1
        visiting.add(key)
        total = 1
        children = [v for pair in obj.items() for v in pair] if isinstance(obj, dict) else obj
        for child in children:
            total += size(child)
            if total > limit:
                break
        visiting.discard(key)
        sizes[key] = total
        return total

    return size(data)


def alias_bomb_problem(shown: str, data: Any) -> Problem | None:
    """A Problem when YAML aliases make `data` expand past MAX_EXPANDED_VALUES (an alias bomb)."""
    if expanded_size(data) > MAX_EXPANDED_VALUES:
        return Problem(shown, 1, f"the YAML expands to more than {MAX_EXPANDED_VALUES:,} values through "
                                 "aliases (*name) or refers to itself; write the values out instead of aliasing them")
    return None


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
    """Load a file for editing with a YAML instance set to the file's own indentation.

    The text is read as `write_edited` will write it back: BOM dropped and CRLF as LF here,
    both restored on write.
    """
    raw = path.read_bytes()
    text, problem = decode_utf8(str(path), raw)
    if problem is not None:
        raise AtlasError(str(problem))
    assert text is not None
    text = text.replace("\r\n", "\n")
    _, indent, block_seq_indent = load_yaml_guess_indent(text)
    yaml = round_trip_yaml()
    # ruamel guesses the sequence indent and the dash offset; the mapping indent is the rest
    sequence = indent or 2
    offset = block_seq_indent or 0
    yaml.indent(mapping=max(sequence - offset, 1), sequence=sequence, offset=offset)
    data = yaml.load(text)
    problem = alias_bomb_problem(str(path), data)
    if problem is not None:
        raise AtlasError(str(problem))
    return data, yaml


def dump_to_text(yaml: YAML, data: Any) -> str:
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def write_edited(path: Path, yaml: YAML, data: Any) -> None:
    """Write an edited file back atomically, keeping its BOM, line endings, mode and symlink."""
    write_text_like(path, dump_to_text(yaml, data))
