"""HTML building blocks of the report: escaping, the one number sanitizer, tables, figure blocks.

Every number that enters the page goes through `clean` (JSON, plotly) or `fmt` (HTML text):
NaN and infinities become JSON `null` and the text "–", so no figure or table can fail on a
missing estimate, and a confidence interval over a single observation reads "n = 1, no CI".

Untrusted text (prompts, responses, labels, keywords, findings) is HTML-escaped where it enters
the page, including plotly hover text and tick labels (plotly renders a subset of HTML there).
Embedded JSON has `<`, `>`, `&` and the JavaScript line separators written as `\\u` escapes, so
no `</script>` or `<!--` can end a script block early.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

MAX_TEXT = 300


# ------------------------------------------------------------------------------------ sanitizing
def is_missing(value: Any) -> bool:
    """None, NaN, ±inf, pandas NA: a number the page shows as "–" and JSON carries as null."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating):
        return not math.isfinite(float(value))
    return False


def clean(value: Any) -> Any:
    """Plain JSON-ready data: numpy and pandas to Python, NaN/inf to None, recursively."""
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | pd.Series | pd.Index):
        return [clean(v) for v in value.tolist()]
    if isinstance(value, list | tuple | set | frozenset):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if is_missing(value):
        return None
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime | dt.date | pd.Timestamp):
        return value.isoformat()
    return str(value)


def script_json(obj: Any) -> str:
    """JSON safe inside <script>: sanitized, then `<`, `>`, `&` and U+2028/9 as \\u escapes."""
    text = json.dumps(clean(obj), ensure_ascii=False, allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def esc(value: Any) -> str:
    """HTML-escape anything (quotes too, so it is safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def short(text: Any, limit: int = MAX_TEXT) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def hover(text: Any, limit: int = MAX_TEXT, width: int = 80) -> str:
    """Escaped hover text, wrapped with <br> (the only markup we add ourselves)."""
    s = short(text, limit)
    lines = [s[i : i + width] for i in range(0, len(s), width)] or [""]
    return "<br>".join(esc(line) for line in lines)


def fmt(value: Any, digits: int = 3) -> str:
    """A cell's text: "–" for anything missing, fixed digits for floats, yes/no for booleans."""
    if is_missing(value):
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}f}"
    return str(value)


def ci_text(low: Any, high: Any, n: Any = None, digits: int = 3) -> str:
    """"[low, high]"; "n = 1, no CI" where one observation cannot have an interval; "–" if absent."""
    if not is_missing(n) and isinstance(n, int | float | np.integer | np.floating) and int(n) <= 1:
        return f"n = {int(n)}, no CI"
    if is_missing(low) or is_missing(high):
        return "–"
    return f"[{fmt(low, digits)}, {fmt(high, digits)}]"


def safe_class(value: Any) -> str:
    """A CSS class name from untrusted text: letters, digits, '-' and '_' only."""
    return "".join(ch for ch in str(value).lower() if ch.isascii() and (ch.isalnum() or ch in "-_"))[:40]


# ------------------------------------------------------------------------------------ tables
def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, max_rows: int = 500) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        if i >= max_rows:
            body.append(f"<tr><td colspan='{len(columns)}' class='small'>… more rows in the data files</td></tr>")
            break
        cells = [f"<td class='num'>{esc(fmt(v))}</td>" if _is_number(v) else f"<td>{esc(short(fmt(v)))}</td>"
                 for v in row]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='tablewrap'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def df_table(df: pd.DataFrame, columns: Sequence[str] | None = None, max_rows: int = 500) -> str:
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    return html_table(cols, df[cols].itertuples(index=False, name=None), max_rows=max_rows)


def not_run(what: str, how: str = "refusal-atlas run") -> str:
    return f"<p class='notrun'>not run: no {esc(what)} in this atlas (produced by <code>{esc(how)}</code>)</p>"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists stay values)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            else:
                out[key] = v
    return out


# ------------------------------------------------------------------------------------ figures
class Figures:
    """Collects plotly figures as JSON blocks and returns their container divs."""

    def __init__(self) -> None:
        self.blocks: list[str] = []

    def add(self, fig: go.Figure, height: int = 480) -> str:
        n = len(self.blocks)
        spec = fig.to_plotly_json()
        spec["layout"].pop("template", None)  # the default template is large; plotly applies its own
        spec["layout"].setdefault("height", height)
        self.blocks.append(f"<script type='application/json' id='fig-data-{n}'>{script_json(spec)}</script>")
        return f"<div class='figure' id='fig-{n}' data-fig='fig-data-{n}' style='min-height:{height}px'></div>"


def none_for_nan(values: Iterable[Any]) -> list[Any]:
    """A list for plotly where every missing number is None (a gap, not an error)."""
    return [None if is_missing(v) else v for v in values]
