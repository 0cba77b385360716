"""Writing a benchmark's results: the JSON record, its Markdown table beside it, and the load it ran under."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def write_results(res: dict[str, Any], out: Path, markdown: Callable[[dict[str, Any]], str],
                  load_before: Sequence[float]) -> None:
    """Record the 1-minute load averages before and after, write `out` (JSON) and `out` with .md, print the table."""
    res["load_before"] = " ".join(f"{v:.1f}" for v in load_before)
    res["load_after"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
