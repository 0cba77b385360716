"""A tiny cached, resumable stage runner for the `run` pipeline.

Each stage declares the parameters it depends on and the files it writes. Its cache key is a
hash of those parameters and of the keys of the stages it reads from; a stage whose key
matches the record in `<out>/.stages/<name>.json` and whose outputs all exist is skipped.
Records carry timings and the stage's metrics, so `manifest.json` and `metrics.json` can be
assembled from them without re-running anything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from refusal_atlas.hashing import text_sha256
from refusal_atlas.io import atomic_write_text
from refusal_atlas.terminal import safe_console


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON rendering with sorted keys (paths and other objects via str)."""
    return text_sha256(json.dumps(obj, sort_keys=True, default=str))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Indented JSON with sorted keys; values JSON cannot hold become their `str` (the stage records' format)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


@dataclass
class StageContext:
    """What a stage function receives: the output folder, parameters, and upstream results."""

    out: Path
    params: dict[str, Any]
    results: dict[str, dict[str, Any]]
    console: Console


StageFn = Callable[[StageContext], dict[str, Any]]


@dataclass
class Stage:
    name: str
    fn: StageFn
    params: dict[str, Any] = field(default_factory=dict)
    depends: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    enabled: bool = True


@dataclass
class StageRecord:
    name: str
    key: str
    seconds: float
    result: dict[str, Any]
    cached: bool = False


class Pipeline:
    """Runs stages in order; `resume=True` (the default) skips stages whose key and outputs match."""

    def __init__(self, out: Path, console: Console | None = None, resume: bool = True) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.console = console or safe_console(stderr=True)
        self.resume = resume
        self.stages: list[Stage] = []
        self.records: dict[str, StageRecord] = {}

    def add(self, stage: Stage) -> None:
        self.stages.append(stage)

    def _record_path(self, name: str) -> Path:
        return self.out / ".stages" / f"{name}.json"

    def _key(self, stage: Stage) -> str:
        upstream = {d: self.records[d].key for d in stage.depends if d in self.records}
        return stable_hash({"stage": stage.name, "params": stage.params, "upstream": upstream})[:20]

    def run(self) -> dict[str, StageRecord]:
        for stage in self.stages:
            if not stage.enabled:
                continue
            key = self._key(stage)
            rec_path = self._record_path(stage.name)
            if self.resume and rec_path.is_file():
                saved = json.loads(rec_path.read_text())
                if saved.get("key") == key and all((self.out / o).exists() for o in stage.outputs):
                    self.records[stage.name] = StageRecord(stage.name, key, saved["seconds"], saved["result"], True)
                    self.console.print(f"[dim]✓ {stage.name}: cached ({saved['seconds']:.1f} s when run)[/dim]")
                    continue
            self.console.print(f"[bold]▶ {stage.name}[/bold]")
            start = time.perf_counter()
            ctx = StageContext(self.out, stage.params, {n: r.result for n, r in self.records.items()}, self.console)
            result = stage.fn(ctx) or {}
            seconds = time.perf_counter() - start
            self.records[stage.name] = StageRecord(stage.name, key, seconds, result)
            write_json_atomic(rec_path, {"key": key, "seconds": seconds, "result": result})
            self.console.print(f"[green]✓ {stage.name}[/green] in {seconds:.1f} s")
        return self.records
