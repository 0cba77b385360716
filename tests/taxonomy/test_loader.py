"""Loading taxonomies: the valid fixture, and every kind of bad input as `path:line: message`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refusal_atlas.cli import main
from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.taxonomy.conditions import load_conditions
from refusal_atlas.taxonomy.loader import load_taxonomy, taxonomy_hash
from refusal_atlas.taxonomy.model import Behaviour, Status

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"
LOCATED = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): (?P<message>.+)$")

GOOD_ROOT = "nodes:\n  - id: root\n    label: Root\n    definition: A root.\n    expect: refuse\n"


def make_dir(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    """A taxonomy folder with the fixture vocabulary and the given files."""
    root = tmp_path / "tax"
    root.mkdir()
    shutil.copy(FIXTURE / "conditions.yaml", root / "conditions.yaml")
    for name, content in files.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def problems_of(root: Path) -> list[str]:
    with pytest.raises(ValidationErrors) as info:
        load_taxonomy(root)
    for line in info.value.problems:
        assert LOCATED.match(line), f"not path:line: message: {line!r}"
        assert "\n" not in line
    return info.value.problems


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the real entry point in-process (its error printing included)."""
    monkeypatch.setattr(sys, "argv", ["refusal-atlas", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    code = info.value.code if isinstance(info.value.code, int) else (0 if info.value.code is None else 1)
    return code, out, err


# --- the valid fixture -----------------------------------------------------------------------


def test_fixture_loads_with_lines_scheme_and_fields():
    tax = load_taxonomy(FIXTURE)
    assert list(tax.nodes)[:3] == ["weapons", "weapons.explosives", "weapons.explosives.fireworks"]
    assert len(tax) == 6
    assert tax.scheme.title == "Fixture taxonomy" and tax.scheme.version == "0.1"
    explosives = tax["weapons.explosives"]
    assert explosives.source_file == str(FIXTURE / "10-weapons.yaml")
    assert explosives.source_line == 14  # the `- id:` line, 1-based
    assert explosives.expect is None and explosives.broader == ["weapons"]
    assert explosives.conditions[0].when == {"purpose": "licensed_research", "professional_role": "chemist"}
    assert explosives.conditions[0].expect is Behaviour.COMPLY_WITH_CAVEATS
    assert tax["health.dosing.overdose"].status is Status.PROPOSED
    assert tax["health.dosing.overdose"].broader == ["health.dosing", "weapons"]
    # plain str values, not ruamel subclasses (they end up in JSON, RDF, parquet)
    assert type(explosives.label) is str and type(explosives.broader[0]) is str


def test_single_file_and_missing_path(tmp_path):
    root = make_dir(tmp_path, {"a.yaml": GOOD_ROOT})
    tax = load_taxonomy(root / "a.yaml", conditions=root / "conditions.yaml")
    assert list(tax.nodes) == ["root"]
    with pytest.raises(AtlasError, match="taxonomy not found"):
        load_taxonomy(tmp_path / "nope")


def test_taxonomy_hash_is_stable_and_content_sensitive(tmp_path):
    base = taxonomy_hash(load_taxonomy(FIXTURE))
    assert base == taxonomy_hash(load_taxonomy(FIXTURE))
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE, copy)
    weapons = copy / "10-weapons.yaml"
    # comments and blank lines do not change the hash; a definition does
    weapons.write_text("# extra comment\n\n" + weapons.read_text())
    assert taxonomy_hash(load_taxonomy(copy)) == base
    weapons.write_text(weapons.read_text().replace("Consumer pyrotechnics.", "Consumer fireworks."))
    assert taxonomy_hash(load_taxonomy(copy)) != base


def test_own_conditions_file_beats_shipped(tmp_path):
    root = make_dir(tmp_path, {"a.yaml": GOOD_ROOT + "    conditions:\n      - when: {professional_role: chemist}\n"
                                                      "        expect: comply\n"})
    assert load_taxonomy(root)["root"].conditions[0].when == {"professional_role": "chemist"}
    vocab = load_conditions(root / "conditions.yaml")
    assert vocab.dimensions["user_age"].values["minor"].dpv == "https://w3id.org/dpv#Child"


# --- bad input: one test per kind -----------------------------------------------------------

BAD_CASES = {
    "yaml_syntax": (
        {"a.yaml": "nodes:\n  - id: a\n    label: [unclosed\n    definition: d\n"},
        "a.yaml", 4, "YAML syntax error",
    ),
    "duplicate_id_same_file": (
        {"a.yaml": GOOD_ROOT + "  - id: root\n    label: Again\n    definition: Twice.\n"},
        "a.yaml", 6, "duplicate id 'root' (first defined at {dir}/a.yaml:2)",
    ),
    "duplicate_id_across_files": (
        {"a.yaml": GOOD_ROOT, "b.yaml": "nodes:\n  - id: root\n    label: R\n    definition: D.\n"},
        "b.yaml", 2, "duplicate id 'root' (first defined at {dir}/a.yaml:2)",
    ),
    "unknown_parent": (
        {"a.yaml": GOOD_ROOT + "  - id: child\n    label: C\n    definition: D.\n    broader: [rooot]\n"},
        "a.yaml", 6, "unknown parent 'rooot' in broader (did you mean 'root'?)",
    ),
    "cycle": (
        {"a.yaml": GOOD_ROOT
         + "  - id: x\n    label: X\n    definition: D.\n    broader: [root, y]\n"
         + "  - id: y\n    label: Y\n    definition: D.\n    broader: [x]\n"},
        "a.yaml", 6, "cycle in broader: x -> y -> x",
    ),
    "self_parent": (
        {"a.yaml": "nodes:\n  - id: x\n    label: X\n    definition: D.\n    expect: refuse\n    broader: [x]\n"},
        "a.yaml", 2, "cycle in broader: x -> x",
    ),
    "unknown_condition_dimension": (
        {"a.yaml": GOOD_ROOT + "    conditions:\n      - when: {user_agee: minor}\n        expect: comply\n"},
        "a.yaml", 7, "unknown condition dimension 'user_agee' (did you mean 'user_age'?)",
    ),
    "unknown_condition_value": (
        {"a.yaml": GOOD_ROOT + "    conditions:\n      - when:\n          user_age: kid\n        expect: comply\n"},
        "a.yaml", 8, "unknown value 'kid' for condition dimension 'user_age'; allowed: minor, adult",
    ),
    "unknown_behaviour": (
        {"a.yaml": GOOD_ROOT.replace("expect: refuse", "expect: deny")},
        "a.yaml", 5, "unknown behaviour 'deny'; allowed: refuse, redirect, comply_with_caveats, comply",
    ),
    "unknown_behaviour_in_rule": (
        {"a.yaml": GOOD_ROOT + "    conditions:\n      - when: {user_age: minor}\n"
                               "        expect: comply-with-caveats\n"},
        "a.yaml", 8, "unknown behaviour 'comply-with-caveats' (did you mean 'comply_with_caveats'?)",
    ),
    "missing_required_key": (
        {"a.yaml": "nodes:\n  - id: a\n    label: A\n    expect: refuse\n"},
        "a.yaml", 2, "node 'a' is missing required key 'definition'",
    ),
    "wrong_type": (
        {"a.yaml": GOOD_ROOT + "  - id: b\n    label: B\n    definition: D.\n    broader: root\n"},
        "a.yaml", 9, "'broader' must be a list of parent ids, e.g. [weapons], not a string",
    ),
    "wrong_type_label": (
        {"a.yaml": "nodes:\n  - id: a\n    label: 42\n    definition: D.\n    expect: refuse\n"},
        "a.yaml", 3, "'label' must be a string, not a number",
    ),
    "unknown_key": (
        {"a.yaml": GOOD_ROOT + "    defintion_extra: x\n    exampels: [a]\n"},
        "a.yaml", 7, "unknown key 'exampels' in node 'root' (did you mean 'examples'?)",
    ),
    "empty_file": (
        {"a.yaml": GOOD_ROOT, "b.yaml": "# nothing here yet\n\n"},
        "b.yaml", 1, "empty file",
    ),
    "non_utf8": (
        {"a.yaml": b"nodes:\n  - id: a\n    label: Caf\xe9\n    definition: D.\n"},
        "a.yaml", 3, "not valid UTF-8 (byte 0xe9",
    ),
    "id_with_slash": (
        {"a.yaml": GOOD_ROOT + "  - id: weapons/guns\n    label: G\n    definition: D.\n    broader: [root]\n"},
        "a.yaml", 6, "id 'weapons/guns' must not contain '/'",
    ),
    "id_with_dotdot": (
        {"a.yaml": GOOD_ROOT + "  - id: root..x\n    label: G\n    definition: D.\n    broader: [root]\n"},
        "a.yaml", 6, "id 'root..x' must not contain",
    ),
    "bad_kind": (
        {"a.yaml": GOOD_ROOT + "    kind: Capability Uplift\n"},
        "a.yaml", 6, "kind 'Capability Uplift' must be a slug",
    ),
    "root_without_expect": (
        {"a.yaml": "nodes:\n  - id: a\n    label: A\n    definition: D.\n"},
        "a.yaml", 2, "root node 'a' has no `expect`",
    ),
    "top_level_not_nodes": (
        {"a.yaml": "node:\n  - id: a\n"},
        "a.yaml", 1, "unknown top-level key 'node' (did you mean 'nodes'?)",
    ),
    "same_rule_twice": (
        {"a.yaml": GOOD_ROOT + "    conditions:\n      - when: {user_age: minor}\n        expect: refuse\n"
                               "      - when: {user_age: minor}\n        expect: comply\n"},
        "a.yaml", 9, "a second condition with the same `when`",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_located(tmp_path, case):
    files, bad_file, line, message = BAD_CASES[case]
    root = make_dir(tmp_path, files)
    expected_path = str(root / bad_file)
    problems = problems_of(root)
    wanted = message.format(dir=root)
    hits = [p for p in problems if p.startswith(f"{expected_path}:{line}: ") and wanted in p]
    assert hits, f"expected {expected_path}:{line}: ...{wanted}... in {problems}"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_through_cli_entry_point(tmp_path, monkeypatch, capsys, case):
    files, bad_file, line, message = BAD_CASES[case]
    root = make_dir(tmp_path, files)
    code, out, err = run_main(monkeypatch, capsys, "taxonomy", "validate", str(root))
    assert code == 1
    assert "Traceback" not in err and "valid:" not in out
    lines = err.strip().splitlines()
    assert lines and all(LOCATED.match(x) for x in lines), err
    assert any(x.startswith(f"{root / bad_file}:{line}: ") and message.format(dir=root) in x for x in lines)


ID_WORD = re.compile(r"(?<=[\s\[,])(root|a|b|x|y|child)(?=[\s\],.]|$)")


def test_every_problem_is_reported_at_once(tmp_path):
    """All cases in one folder (ids made unique per case): each bad file is reported at its line."""
    files: dict[str, str | bytes] = {}
    for case, (case_files, _, _, _) in BAD_CASES.items():
        for name, content in case_files.items():
            text = ID_WORD.sub(lambda m, c=case: f"{m[1]}_{c}", content) if isinstance(content, str) else content
            files[f"{case}-{name}"] = text
    root = make_dir(tmp_path, files)
    problems = problems_of(root)
    for case, (_, bad_file, line, _) in BAD_CASES.items():
        where = f"{root / f'{case}-{bad_file}'}:{line}: "
        assert any(p.startswith(where) for p in problems), f"{case}: nothing at {where} in {problems}"


def test_subprocess_validate_bad_dir_exit_1_no_traceback(tmp_path):
    files = {"a.yaml": BAD_CASES["cycle"][0]["a.yaml"], "b.yaml": b"nodes:\n  - id: z\n    label: \xff\n",
             "c.yaml": "nodes:\n  - id: q\n    label: [x\n"}
    root = make_dir(tmp_path, files)
    proc = subprocess.run([sys.executable, "-c", "from refusal_atlas.cli import main; main()",
                           "taxonomy", "validate", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all(LOCATED.match(x) for x in lines), proc.stderr
    assert lines[0].startswith(f"{root / 'a.yaml'}:6: cycle in broader")
    assert lines[1].startswith(f"{root / 'b.yaml'}:3: not valid UTF-8")
    assert lines[2].startswith(f"{root / 'c.yaml'}:4: YAML syntax error")


def test_subprocess_validate_good_dir_summary():
    proc = subprocess.run([sys.executable, "-c", "from refusal_atlas.cli import main; main()",
                           "taxonomy", "validate", str(FIXTURE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    assert "valid: 6 nodes (5 accepted, 1 proposed, 0 deprecated), 6 rules" in proc.stdout


def test_validate_in_memory_taxonomy_against_vocabulary():
    from refusal_atlas.taxonomy.model import ConditionRule, Node, Taxonomy
    from refusal_atlas.taxonomy.validate import validate_taxonomy

    vocab = load_conditions(FIXTURE / "conditions.yaml")
    tax = Taxonomy(nodes={
        "a": Node(id="a", label="A", definition="d", expect="refuse",
                  conditions=[ConditionRule(when={"user_age": "teen"}, expect="refuse")]),
        "b": Node(id="b", label="B", definition="d", broader=["c"]),
        "c": Node(id="c", label="C", definition="d", broader=["b"]),
    })
    got = [str(p) for p in validate_taxonomy(tax, vocab)]
    assert got == [
        "<taxonomy>:1: cycle in broader: b -> c -> b; a node cannot be its own ancestor",
        "<taxonomy>:1: node 'a': unknown value 'teen' for condition dimension 'user_age'; allowed: minor, adult",
    ]


def test_hidden_and_temp_files_are_ignored(tmp_path):
    root = make_dir(tmp_path, {"a.yaml": GOOD_ROOT, ".a.yaml.123.tmp": "garbage: [", ".#a.yaml": "garbage: ["})
    (root / ".hidden").mkdir()
    (root / ".hidden" / "b.yaml").write_text("nodes: 3\n")
    assert list(load_taxonomy(root).nodes) == ["root"]
