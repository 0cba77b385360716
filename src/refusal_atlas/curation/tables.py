"""Reading and writing prompt sets and corpora as CSV, JSONL or Parquet (chosen by extension).

Every stage of curation exchanges tables through files, so this module owns the rules that keep
them safe: outputs are written atomically (a crash never leaves half a file), malformed input rows
are never dropped silently but written to `<output>.rejects.jsonl` with their row number and reason,
and a missing column or an empty table is one clear `AtlasError` instead of a pandas traceback.

Row numbers: for JSONL the 1-based line number; for CSV and Parquet the 1-based data row (the row
after the header is row 1). `read_table` keeps them as the DataFrame index so later checks can
report `file:row N`. A rejected row is recorded with its content (`record`), so nothing a user
gave is lost even when `-o` replaces an earlier output.

CSV rules: UTF-8 with or without a BOM (Excel's "CSV UTF-8" writes one); lines starting with `#`
*before the header* are comments (some published files carry a version line there); after the
header nothing is stripped, so a cell may hold `# Step 1` or start a line with `#`. Cells may be
up to MAX_CELL_BYTES long.

This module is the one table reader and writer of the package; every write goes through
`refusal_atlas.io.atomic_write`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write
from refusal_atlas.terminal import one_line

__all__ = [
    "LIST_COLUMNS", "MAX_CELL_BYTES", "SUFFIXES", "atomic_write", "jsonl_lines", "read_table", "reject", "rejects_path",
    "require_columns", "require_rows", "set_aside", "table_format", "write_rejects", "write_table",
]

# The csv module refuses cells over 128 KiB by default; long model responses and pasted documents
# exceed that. 64 MiB still bounds the memory one malformed (unclosed-quote) cell can take.
MAX_CELL_BYTES = 64 * 1024 * 1024

SUFFIXES = (".csv", ".jsonl", ".parquet")
LIST_COLUMNS = ("nodes",)


def table_format(path: Path | str) -> str:
    """`csv`, `jsonl` or `parquet` from the file name; anything else is an AtlasError."""
    suffix = Path(path).suffix.lower()
    if suffix == ".ndjson":
        suffix = ".jsonl"
    if suffix not in SUFFIXES:
        raise AtlasError(f"{path}: unsupported table format {suffix or '(none)'!r}; use .csv, .jsonl or .parquet")
    return suffix[1:]


def rejects_path(out: Path | str) -> Path:
    """Where the rejected rows of an output go: beside it, `<out>.rejects.jsonl`."""
    out = Path(out)
    return out.with_name(out.name + ".rejects.jsonl")


def reject(rejects: list[dict] | None, *, source: str | Path, row: Any, reason: str, record: Any = None,
           **extra: Any) -> None:
    """Record one rejected row with its content (`record`), so the rejects file can restore it."""
    if rejects is not None:
        entry = {"source": str(source), "row": row, "reason": reason, **extra}
        if record is not None:
            entry["record"] = _plain(record)
        rejects.append(entry)


def _plain(record: Any) -> Any:
    """A row (Series, dict, list) as JSON-ready plain values."""
    if isinstance(record, pd.Series):
        record = record.to_dict()
    if isinstance(record, dict):
        return {str(k): _plain_value(v) for k, v in record.items()}
    if isinstance(record, list | tuple):
        return [_plain_value(v) for v in record]
    return _plain_value(record)


def _plain_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def _parse_list_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, list) else value
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def jsonl_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for each non-blank line of a JSON-lines file."""
    with open(path, encoding=encoding) as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                yield lineno, line


def _read_jsonl(path: Path, rejects: list[dict] | None) -> pd.DataFrame:
    records: list[dict] = []
    index: list[int] = []
    for lineno, line in jsonl_lines(path, "utf-8-sig"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            reject(rejects, source=path, row=lineno, reason=f"invalid JSON ({exc.msg})", text=line.rstrip("\n"))
            continue
        if not isinstance(obj, dict):
            reject(rejects, source=path, row=lineno, reason="line is not a JSON object", record=obj)
            continue
        records.append(obj)
        index.append(lineno)
    return pd.DataFrame.from_records(records, index=pd.Index(index, name="row"))


def _read_csv(path: Path, rejects: list[dict] | None) -> pd.DataFrame:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        text = fh.read()
    # Leading `#` lines only (see the module docstring): the header ends the comment block.
    start = 0
    while start < len(text) and text.startswith("#", start):
        end = text.find("\n", start)
        start = len(text) if end < 0 else end + 1
    if csv.field_size_limit() < MAX_CELL_BYTES:
        csv.field_size_limit(MAX_CELL_BYTES)
    lines = list(io.StringIO(text[start:], newline=""))
    reader = csv.reader(iter(lines))
    try:
        header = next(reader)
    except StopIteration:
        return pd.DataFrame()
    except csv.Error as exc:
        raise AtlasError(f"{path}: header row: {exc}") from exc
    records: list[list[str]] = []
    index: list[int] = []
    rowno = 0
    while True:
        first_line = reader.line_num
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise AtlasError(f"{path}: row {rowno + 1}: {exc}; fix the quoting in that row") from exc
        rowno += 1
        if reader.line_num == len(lines) and _quote_left_open(lines[first_line:]):
            # the lenient reader ends an unclosed quoted field at the end of the file, so every later row
            # would silently become part of one cell
            raise AtlasError(f"{path}: row {rowno} (line {first_line + 1 + _lines_before(text, start)}): a quoted "
                             "field opened there is never closed; close the quote or double the \" inside it")
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            reject(rejects, source=path, row=rowno, reason=f"expected {len(header)} fields, found {len(fields)}",
                   record=fields)
            continue
        records.append(fields)
        index.append(rowno)
    df = pd.DataFrame(records, columns=header, index=pd.Index(index, name="row"), dtype=object)
    for col in df.columns:
        if col in LIST_COLUMNS:
            df[col] = df[col].map(_parse_list_cell)
    return df


def _quote_left_open(record_lines: list[str]) -> bool:
    """Whether a strict reader runs out of input inside a quoted field of this record."""
    try:
        list(csv.reader(iter(record_lines), strict=True))
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def _lines_before(text: str, start: int) -> int:
    """How many physical lines (comments) precede the header."""
    return text.count("\n", 0, start)


def read_table(path: Path | str, *, rejects: list[dict] | None = None) -> pd.DataFrame:
    """Read a table by extension; malformed rows go to `rejects` (if given) with their row number.

    `#` lines before a CSV's header are comments (module docstring). Values of CSV columns are
    strings; list columns (`nodes`) written as JSON arrays are parsed back.
    """
    path = Path(path)
    fmt = table_format(path)
    if path.is_dir():
        raise AtlasError(f"{path}: is a folder; name a table file")
    if not path.is_file():
        raise AtlasError(f"{path}: file not found")
    try:
        if fmt == "jsonl":
            df = _read_jsonl(path, rejects)
        elif fmt == "csv":
            df = _read_csv(path, rejects)
        else:
            df = pd.read_parquet(path)
            df.index = pd.RangeIndex(1, len(df) + 1, name="row")
            for col in LIST_COLUMNS:
                if col in df.columns:
                    df[col] = df[col].map(_parse_list_cell)
    except UnicodeDecodeError as exc:
        raise AtlasError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8 "
                         "(e.g. `iconv -f latin1 -t utf-8`)") from exc
    except (OSError, ValueError) as exc:  # pyarrow errors derive from these
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AtlasError(f"{path}: cannot read {fmt} table ({first})") from exc
    _require_unique_columns(df, path)
    return df


def _require_unique_columns(df: pd.DataFrame, path: Path) -> None:
    # a repeated header name makes `df[name]` a frame instead of a column, which fails far from the cause
    seen: dict[str, int] = {}
    for position, name in enumerate(map(str, df.columns), start=1):
        if name in seen:
            raise AtlasError(f"{path}: column {name!r} appears twice in the header (columns {seen[name]} and "
                             f"{position}); rename or remove one")
        seen[name] = position


def require_columns(df: pd.DataFrame, columns: Sequence[str], path: Path | str, hint: str = "") -> None:
    """One clear error naming every missing column and the ones that exist."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        have = ", ".join(one_line(str(c)) for c in df.columns) or "(none)"
        extra = f"; {hint}" if hint else ""
        raise AtlasError(f"{path}: missing column(s) {', '.join(map(one_line, missing))} (found: {have}){extra}")


def set_aside(df: pd.DataFrame, clashes: Callable[[str], bool] | Collection[str],
              taken: Collection[str] = ()) -> pd.DataFrame:
    """`df` with every column a step is about to write (`clashes`) renamed `input_<name>`, never overwritten.

    The prefix repeats until the name is free of `df`'s columns and `taken`, so an output run through the same
    step again (an assignments file clustered twice: `row` beside `input_row`) keeps every column it had.
    """
    clash = clashes if callable(clashes) else set(clashes).__contains__
    used = {str(c) for c in df.columns} | set(taken)
    mapping: dict[Any, str] = {}
    for col in df.columns:
        if clash(str(col)):
            name = f"input_{col}"
            while name in used:
                name = f"input_{name}"
            used.add(name)
            mapping[col] = name
    return df.rename(columns=mapping) if mapping else df


def require_rows(df: pd.DataFrame, path: Path | str, rejected: int = 0) -> None:
    """An empty or all-rejected table is an error, never an empty output."""
    if len(df) == 0:
        if rejected:
            raise AtlasError(f"{path}: all {rejected} row(s) were rejected; see {rejects_path(path)}")
        raise AtlasError(f"{path}: no rows")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _records(df: pd.DataFrame) -> Iterable[dict]:
    cols = list(df.columns)
    for values in df.itertuples(index=False, name=None):
        rec = {}
        for col, v in zip(cols, values, strict=True):
            if isinstance(v, float) and np.isnan(v):
                v = None
            rec[str(col)] = v
        yield rec


def write_table(df: pd.DataFrame, path: Path | str) -> Path:
    """Write by extension, atomically. List cells become JSON arrays in CSV, real arrays elsewhere."""
    path = Path(path)
    fmt = table_format(path)
    out = df.reset_index(drop=True)

    def _write(tmp: Path) -> None:
        if fmt == "parquet":
            _parquet_ready(out).to_parquet(tmp, index=False)
        elif fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for rec in _records(out):
                    fh.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
        else:
            csv_df = out.copy()
            for col in csv_df.columns:
                if csv_df[col].map(lambda v: isinstance(v, list | tuple | np.ndarray)).any():
                    csv_df[col] = csv_df[col].map(lambda v: json.dumps(list(v), ensure_ascii=False)
                                                  if isinstance(v, list | tuple | np.ndarray) else v)
            csv_df.to_csv(tmp, index=False)

    try:
        return atomic_write(path, _write)
    except (ValueError, TypeError) as exc:  # pyarrow's ArrowInvalid / ArrowTypeError derive from these
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AtlasError(f"{path}: cannot write {fmt} ({first[:200]}); write .jsonl instead, or make each "
                         "column hold one type") from exc


def _parquet_ready(df: pd.DataFrame) -> pd.DataFrame:
    """Columns Arrow can store: a text column holding some numbers (a user's id column) becomes text.

    Arrow needs one type per column; mixing ints and strings would fail with ArrowInvalid. Only
    object columns that mix scalar types are converted; lists and missing values are kept.
    """
    out = df
    for col in df.columns:
        series = df[col]
        if series.dtype != object:
            continue
        kinds = {type(v) for v in series if v is not None and not (isinstance(v, float) and np.isnan(v))}
        scalar = {k for k in kinds if not issubclass(k, list | tuple | dict | np.ndarray)}
        if len(scalar) > 1 and str in scalar and scalar == kinds:
            if out is df:
                out = df.copy()
            out[col] = series.map(lambda v: v if v is None or isinstance(v, str)
                                  or (isinstance(v, float) and np.isnan(v)) else str(v))
    return out


def write_rejects(out: Path | str, rejects: list[dict]) -> Path | None:
    """Write `<out>.rejects.jsonl` (atomically) when there are rejects; remove a stale one otherwise."""
    target = rejects_path(out)
    if not rejects:
        target.unlink(missing_ok=True)
        return None

    def _write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in rejects:
                fh.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")

    return atomic_write(target, _write)
