"""Range checks for numeric options, run while the command line is parsed.

Typer's `min=` / `max=` bounds let `nan` through (every comparison with it is false), and a NaN
threshold silently makes every test fail or pass. `number(...)` returns a callback that refuses
non-finite values and values outside the bounds, so a bad option is a usage error (exit 2) before
any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import typer

__all__ = ["number"]


def number(lo: float | None = None, hi: float | None = None, *, above: bool = False
           ) -> Callable[[float | None], float | None]:
    """A callback accepting finite values in [lo, hi] (`above`: strictly greater than lo); None passes."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number")
        if lo is not None and (value < lo or (above and value == lo)):
            raise typer.BadParameter(f"{value} must be {'>' if above else '>='} {lo:g}")
        if hi is not None and value > hi:
            raise typer.BadParameter(f"{value} must be <= {hi:g}")
        return value

    return check
