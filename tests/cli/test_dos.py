"""Class 2: no input makes the tool hang or print without bound (alias bombs, runaway SPARQL)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cli.helpers import subprocess_cli
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import brief
from refusal_atlas.ontology.export import build_graph
from refusal_atlas.ontology.sparql import run_query
from refusal_atlas.taxonomy.loader import load_taxonomy

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"


def _bomb(levels: int, width: int = 9) -> str:
    """YAML anchors that expand to width**levels strings (a billion-laughs document)."""
    lines = [f"    a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines)


def _taxonomy_with(tmp_path: Path, field_yaml: str, levels: int) -> Path:
    root = tmp_path / "tax"
    shutil.copytree(FIXTURE, root)
    (root / "30-bomb.yaml").write_text(
        "nodes:\n  - id: bomb\n    label: Bomb\n    definition: A node.\n    broader: [health]\n"
        f"    provenance: x\n    examples: []\n    kind: content\n    bombs:\n{_bomb(levels)}\n"
        f"{field_yaml}\n".replace("BOMB", f"*a{levels - 1}"), encoding="utf-8")
    return root


@pytest.mark.parametrize("field_yaml", [
    "    status: BOMB",
    "    expect: BOMB",
    "    conditions:\n      - when: {user_age: BOMB}\n        expect: refuse",
])
def test_alias_bomb_in_any_field_is_refused_quickly(tmp_path, field_yaml):
    # 9**9 = 387 million strings once expanded: printing or walking them would never end
    root = _taxonomy_with(tmp_path, field_yaml, levels=9)
    proc = subprocess_cli("taxonomy", "validate", str(root))
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("validate did not finish within 60 s on an alias bomb")
    assert proc.returncode == 1 and "Traceback" not in err
    assert "aliases" in err and len(err) < 2000, err[:2000]


@pytest.mark.parametrize("field_yaml", ["    status: BOMB", "    expect: BOMB",
                                        "    conditions:\n      - when: {user_age: BOMB}\n        expect: refuse"])
def test_values_echoed_in_errors_are_bounded(tmp_path, field_yaml):
    # 9**5 = 59,049 strings: under the expansion limit, so the value reaches the field checks
    root = _taxonomy_with(tmp_path, field_yaml, levels=5)
    with pytest.raises(AtlasError) as info:
        load_taxonomy(root)
    assert max(len(line) for line in str(info.value).splitlines()) < 400, str(info.value)[:500]


def test_brief_never_builds_the_full_repr():
    shared = ["x" * 50] * 10
    for _ in range(8):
        shared = [shared] * 10  # 10**9 leaves: repr() would not finish
    started = time.monotonic()
    text = brief(shared)
    assert len(text) <= 80 and time.monotonic() - started < 1
    assert brief("short") == "'short'"


CARTESIAN = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i }"


def test_sparql_time_limit():
    graph = build_graph(FIXTURE)
    started = time.monotonic()
    with pytest.raises(AtlasError, match=r"stopped after 1 s .*--timeout"):
        run_query(graph, CARTESIAN, timeout_s=1)
    assert time.monotonic() - started < 10


def test_sparql_row_limit():
    graph = build_graph(FIXTURE)
    with pytest.raises(AtlasError, match=r"more than 5 rows .*--max-rows"):
        run_query(graph, "SELECT ?s ?p ?o WHERE { ?s ?p ?o }", max_rows=5)
    assert len(run_query(graph, "SELECT ?s WHERE { ?s ?p ?o } LIMIT 5", max_rows=5).rows) == 5


def test_sparql_cli_default_limit_is_one_line(tmp_path):
    proc = subprocess_cli("ontology", "sparql", "SELECT ?a ?b ?c ?d WHERE { ?a ?x ?b . ?c ?y ?d }", "--max-rows", "50")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.strip().count("\n") == 0 and "more than 50 rows" in err and "Traceback" not in err
