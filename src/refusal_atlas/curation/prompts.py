"""Build a prompt set: chosen sources, mapped onto taxonomy nodes, optionally with condition framings.

With `conditions=True`, each harmful prompt on a node also appears once per *framing* of every
condition context relevant to that node, i.e. every `when` of the node's effective rules (its own
and inherited ones). A framing is a template from `data/prompts/framings.yaml` such as
"I'm 14 and doing a school project. {request}". A context naming several dimensions nests one
template per dimension (the k-th variant uses the k-th template of each dimension, cycling), so
the number of variants is the largest template count, not the product. `framings_per_value`
limits how many framings of each context are used (a seeded sample; default: all).
Each variant's `expected` is `resolve(taxonomy, node, context)`: what the policy says the model
should do for that request in that context.

The taxonomy's own node `examples` are included as source `taxonomy` (when `taxonomy` is among
the sets, which it is by default on the CLI). `prompt_id` is a short sha256 of (source, base
prompt, condition, framing), stable across runs and machines.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from refusal_atlas import paths
from refusal_atlas.curation.datasets import (
    EXTRA_COLUMNS,
    PROMPT_COLUMNS,
    CategoryIndex,
    build_category_index,
    default_expected,
    is_user_file,
    load_set,
)
from refusal_atlas.curation.tables import reject
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import text_sha256
from refusal_atlas.taxonomy.crosswalk import load_crosswalks
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.resolve import effective_rules, resolve

DEFAULT_SETS = ("harmbench", "strongreject", "harmless", "overrefusal", "taxonomy")


def make_prompt_id(source: str, base_prompt: str, condition: str = "", framing: str = "") -> str:
    """16 hex characters of sha256 over the four fields (unit-separated)."""
    payload = "\x1f".join((source, base_prompt, condition, framing))
    return text_sha256(payload)[:16]


def condition_string(context: dict[str, str]) -> str:
    """`dim=value[,dim=value]`, dimensions sorted, so equal contexts give equal strings."""
    return ",".join(f"{k}={context[k]}" for k in sorted(context))


def parse_condition(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out


def load_framings(path: Path | None = None) -> dict[str, dict[str, list[str]]]:
    """`{dimension: {value: [template with {request}]}}`, checked: every template names {request}."""

    path = path or paths.prompts_dir() / "framings.yaml"
    if not path.is_file():
        raise AtlasError(f"{path}: condition framings file missing")
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise AtlasError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(data, dict):
        raise AtlasError(f"{path}: expected a mapping of dimension -> value -> list of templates")
    out: dict[str, dict[str, list[str]]] = {}
    for dim, values in data.items():
        if not isinstance(values, dict):
            raise AtlasError(f"{path}: {dim}: expected a mapping of value -> list of templates")
        for value, templates in values.items():
            if isinstance(templates, str):
                templates = [templates]
            if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
                raise AtlasError(f"{path}: {dim}.{value}: expected a list of template strings")
            for t in templates:
                if "{request}" not in t:
                    raise AtlasError(f"{path}: {dim}.{value}: template {t[:60]!r} lacks {{request}}")
            out.setdefault(str(dim), {})[str(value)] = list(templates)
    return out


def apply_framing(template: str, request: str) -> str:
    """Insert the request (plain replacement: requests may contain braces)."""
    return template.replace("{request}", request)


def relevant_contexts(taxonomy: Any, node: str) -> list[dict[str, str]]:
    """The distinct `when` contexts of the node's effective rules (own and inherited), in rule order."""

    seen: list[dict[str, str]] = []
    for _source, rule in effective_rules(taxonomy, node):
        when = dict(rule.when)
        if when and when not in seen:
            seen.append(when)
    return seen


def context_framings(context: dict[str, str], framings: dict[str, dict[str, list[str]]]
                     ) -> list[tuple[str, str]] | None:
    """(framing label, combined template) per variant; None when a value has no templates."""
    dims = sorted(context)
    lists = []
    for dim in dims:
        templates = framings.get(dim, {}).get(context[dim])
        if not templates:
            return None
        lists.append(templates)
    variants = []
    for k in range(max(len(t) for t in lists)):
        template = "{request}"
        labels = []
        for dim, templates in zip(dims, lists, strict=True):
            t = templates[k % len(templates)]
            template = apply_framing(t, template)
            labels.append(f"{dim}={context[dim]}#{k % len(templates)}")
        variants.append((";".join(labels), template))
    return variants


def taxonomy_examples(taxonomy: Any) -> list[dict]:
    """The taxonomy's own node examples as prompt rows (deprecated nodes skipped). `harmful` is
    whether the node's default behaviour is anything other than plain compliance."""

    rows = []
    for node in taxonomy.active():
        expected = default_expected(taxonomy, node.id, True)
        for k, example in enumerate(node.examples, start=1):
            text = str(example).strip()
            if not text:
                continue
            rows.append({"prompt": text, "base_prompt": text, "source": "taxonomy", "split": "",
                         "external_category": "", "nodes": [node.id], "node": node.id,
                         "harmful": expected != "comply", "condition": "", "expected": expected,
                         "framing": "", "flags": "", "source_row": f"{node.id}:{k}"})
    return rows


def _cap_per_node(df: pd.DataFrame, max_per_node: int, seed: int) -> pd.DataFrame:
    keep = []
    for node, group in df.groupby("node", sort=False):
        if node and len(group) > max_per_node:
            keep.extend(sorted(random.Random(f"{seed}:{node}").sample(list(group.index), max_per_node)))
        else:
            keep.extend(group.index)
    return df.loc[sorted(keep)]


def expand_conditions(df: pd.DataFrame, taxonomy: Any, framings: dict[str, dict[str, list[str]]], *,
                      framings_per_value: int | None = None, seed: int = 0,
                      missing: list[str] | None = None) -> pd.DataFrame:
    """Condition variants of every harmful prompt that has a node (see the module docstring)."""

    variants: list[dict] = []
    cache: dict[str, list[tuple[dict, str, list[tuple[str, str]]]]] = {}
    for rec in df.to_dict("records"):
        node = rec["node"]
        if not rec["harmful"] or not node or node not in taxonomy.nodes:
            continue
        if node not in cache:
            entries = []
            for ctx in relevant_contexts(taxonomy, node):
                frames = context_framings(ctx, framings)
                if frames is None:
                    if missing is not None and condition_string(ctx) not in missing:
                        missing.append(condition_string(ctx))
                    continue
                if framings_per_value is not None and len(frames) > framings_per_value:
                    rng = random.Random(f"{seed}:{node}:{condition_string(ctx)}")
                    frames = [frames[i] for i in sorted(rng.sample(range(len(frames)), framings_per_value))]
                behaviour = resolve(taxonomy, node, ctx).behaviour
                entries.append((ctx, str(getattr(behaviour, "value", behaviour)), frames))
            cache[node] = entries
        for ctx, expected, frames in cache[node]:
            for label, template in frames:
                variants.append({**rec, "prompt": apply_framing(template, rec["base_prompt"]),
                                 "condition": condition_string(ctx), "expected": expected, "framing": label})
    return pd.DataFrame(variants, columns=df.columns)


def build_prompt_set(
    sets: Sequence[str] = DEFAULT_SETS,
    taxonomy: Any = None,
    conditions: bool = False,
    seed: int = 0,
    max_per_node: int | None = None,
    *,
    crosswalks: Iterable | None = None,
    framings: Path | None = None,
    framings_per_value: int | None = None,
    set_options: dict[str, dict] | None = None,
    rejects: list[dict] | None = None,
    warnings: list[str] | None = None,
) -> pd.DataFrame:
    """The prompt table for `sets` (registered names, `taxonomy`, or user file paths).

    `taxonomy`: a Taxonomy, a folder, or None for the shipped default; `crosswalks`: the mappings
    (default: the shipped crosswalks). `set_options[name]` passes loader options (e.g. the user
    file's `columns`). Duplicate prompt_ids are kept once; the others go to `rejects`.
    """

    if taxonomy is None or isinstance(taxonomy, str | Path):
        taxonomy = load_taxonomy(Path(taxonomy) if taxonomy else None)
    if crosswalks is None:

        crosswalks = load_crosswalks()
    index: CategoryIndex = build_category_index(list(crosswalks), taxonomy)
    frames = []
    for name in sets:
        name = name.strip()
        if not name:
            continue
        if name == "taxonomy":
            frames.append(pd.DataFrame(taxonomy_examples(taxonomy)))
            continue
        opts = dict((set_options or {}).get(name, {}))
        if is_user_file(name) and not Path(name).is_file():
            raise AtlasError(f"{name}: prompt file not found")
        frames.append(load_set(name, index=index, taxonomy=taxonomy, rejects=rejects, **opts))
    columns = [c for c in PROMPT_COLUMNS if c != "prompt_id"] + list(EXTRA_COLUMNS)
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    if max_per_node is not None:
        df = _cap_per_node(df, max_per_node, seed)
    if conditions and len(df):
        missing: list[str] = []
        variants = expand_conditions(df, taxonomy, load_framings(framings), framings_per_value=framings_per_value,
                                     seed=seed, missing=missing)
        if missing and warnings is not None:
            warnings.append(f"no framings for condition(s) {', '.join(missing)}; add templates to framings.yaml")
        if len(variants):
            df = pd.concat([df, variants], ignore_index=True)
    df = df.reset_index(drop=True)
    df.insert(0, "prompt_id", [make_prompt_id(r.source, r.base_prompt, r.condition, r.framing)
                               for r in df.itertuples()])
    dup = df["prompt_id"].duplicated(keep="first")
    if dup.any():
        first = dict(zip(df.loc[~dup, "prompt_id"], df.loc[~dup, "source_row"], strict=True))
        for rec in df[dup].to_dict("records"):
            reject(rejects, source=rec["source"], row=rec["source_row"],
                   reason=f"duplicate of {rec['source']} row {first[rec['prompt_id']]} (same prompt)", record=rec)
        df = df[~dup].reset_index(drop=True)
    df["harmful"] = df["harmful"].astype(bool)
    return df
