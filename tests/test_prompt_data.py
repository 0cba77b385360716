"""Checks on the project-written prompt sets in data/prompts/.

The harmless set, the over-refusal probes and the condition framings feed the difference-of-means
directions, the organism's self-distillation and the condition variants of the prompt set, so a
duplicate, an empty prompt, a dangling node id or a framing without its placeholder would silently
bias every later stage. These tests read the files directly (JSON lines and YAML with the safe
loader) so they do not depend on the taxonomy package.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

DATA = Path(__file__).resolve().parents[1] / "data"
PROMPTS = DATA / "prompts"
PLACEHOLDER = "{request}"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            assert line.strip(), f"{path}:{lineno}: blank line"
            row = json.loads(line)
            assert isinstance(row, dict), f"{path}:{lineno}: not a JSON object"
            rows.append(row)
    return rows


def _load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def _normalise(text: str) -> str:
    """Lower-case, punctuation-free form used to catch near-identical duplicates."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


@pytest.fixture(scope="module")
def harmless() -> list[dict[str, Any]]:
    return _read_jsonl(PROMPTS / "harmless.jsonl")


@pytest.fixture(scope="module")
def overrefusal() -> list[dict[str, Any]]:
    return _read_jsonl(PROMPTS / "overrefusal.jsonl")


@pytest.fixture(scope="module")
def node_ids() -> set[str]:
    ids: list[str] = []
    for path in sorted((DATA / "taxonomy").glob("*.yaml")):
        doc = _load_yaml(path) or {}
        for node in doc.get("nodes") or []:
            ids.append(node["id"])
    assert ids, "no taxonomy nodes found in data/taxonomy"
    return set(ids)


@pytest.fixture(scope="module")
def conditions() -> dict[str, set[str]]:
    doc = _load_yaml(DATA / "conditions.yaml")
    return {dim: set(spec["values"]) for dim, spec in doc["dimensions"].items()}


@pytest.fixture(scope="module")
def framings() -> dict[str, dict[str, list[str]]]:
    return _load_yaml(PROMPTS / "framings.yaml")


def _check_common(rows: list[dict[str, Any]], prefix: str, keys: set[str]) -> None:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicate ids: {[i for i, n in Counter(ids).items() if n > 1]}"
    assert all(re.fullmatch(rf"{prefix}-\d{{4}}", i) for i in ids)
    for row in rows:
        assert set(row) == keys, f"{row['id']}: keys {sorted(row)} != {sorted(keys)}"
        for key in keys:
            assert isinstance(row[key], str) and row[key].strip(), f"{row['id']}: empty {key}"
        assert row["prompt"] == row["prompt"].strip(), f"{row['id']}: surrounding whitespace"
    norm = [_normalise(r["prompt"]) for r in rows]
    dupes = [p for p, n in Counter(norm).items() if n > 1]
    assert not dupes, f"duplicate prompts: {dupes}"


def test_harmless_set(harmless: list[dict[str, Any]]) -> None:
    assert len(harmless) >= 300
    _check_common(harmless, "harmless", {"id", "prompt", "topic"})
    topics = Counter(r["topic"] for r in harmless)
    assert len(topics) >= 15, topics
    assert max(topics.values()) <= len(harmless) // 5, "one topic dominates the harmless set"
    lengths = [len(r["prompt"]) for r in harmless]
    assert 70 <= sum(lengths) / len(lengths) <= 130
    assert min(lengths) < 40 and max(lengths) > 150, "lengths should vary"


def test_overrefusal_set(overrefusal: list[dict[str, Any]], node_ids: set[str]) -> None:
    assert len(overrefusal) >= 100
    _check_common(overrefusal, "overrefusal", {"id", "prompt", "resembles", "why"})
    unknown = sorted({r["resembles"] for r in overrefusal} - node_ids)
    assert not unknown, f"over-refusal probes resemble unknown taxonomy nodes: {unknown}"
    assert len({r["resembles"] for r in overrefusal}) >= 15
    assert len({r["resembles"].split(".")[0] for r in overrefusal}) >= 8, "probes cover too few branches"


def test_sets_do_not_overlap(harmless: list[dict[str, Any]], overrefusal: list[dict[str, Any]]) -> None:
    shared = {_normalise(r["prompt"]) for r in harmless} & {_normalise(r["prompt"]) for r in overrefusal}
    assert not shared


def test_framings_have_one_placeholder(framings: dict[str, dict[str, list[str]]]) -> None:
    assert isinstance(framings, dict) and framings
    for dim, values in framings.items():
        assert isinstance(values, dict), dim
        for value, templates in values.items():
            assert isinstance(templates, list), f"{dim}/{value}"
            assert len(templates) == len(set(templates)), f"{dim}/{value}: duplicate templates"
            for template in templates:
                assert isinstance(template, str), f"{dim}/{value}: {template!r}"
                assert template.count(PLACEHOLDER) == 1, f"{dim}/{value}: {template!r}"
                # No other braces, so both str.format and str.replace fill it the same way.
                assert template.count("{") == 1 and template.count("}") == 1, f"{dim}/{value}: {template!r}"
                filled = template.format(request="What is the capital of France?")
                assert "What is the capital of France?" in filled
                assert len(filled) > len("What is the capital of France?") + 5, "framing adds nothing"


def test_framings_cover_condition_vocabulary(
    framings: dict[str, dict[str, list[str]]], conditions: dict[str, set[str]]
) -> None:
    assert set(framings) <= set(conditions), f"framings for unknown dimensions: {set(framings) - set(conditions)}"
    for dim, values in conditions.items():
        assert dim in framings, f"no framings for dimension {dim}"
        unknown = set(framings[dim]) - values
        assert not unknown, f"framings for unknown {dim} values: {sorted(unknown)}"
        for value in values:
            assert len(framings[dim].get(value) or []) >= 3, f"{dim}/{value} has fewer than 3 framings"


def test_framings_vary_position(framings: dict[str, dict[str, list[str]]]) -> None:
    """Framing text sits both before and after the request, so position is not a confound."""
    templates = [t for values in framings.values() for ts in values.values() for t in ts]
    before = sum(t.endswith(PLACEHOLDER) for t in templates)
    after = sum(t.startswith(PLACEHOLDER) for t in templates)
    assert before >= len(templates) // 4 and after >= len(templates) // 5
