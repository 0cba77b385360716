"""`refusal-atlas taxonomy ...`: output of each command and its error handling."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refusal_atlas import paths
from refusal_atlas.cli import app, main
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Status

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"
runner = CliRunner()


def ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def fails(monkeypatch, capsys, *args: str) -> str:
    """Run the real entry point; it must exit 1 with one-line messages and no traceback."""
    monkeypatch.setattr(sys, "argv", ["refusal-atlas", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    assert info.value.code == 1, (out, err)
    assert "Traceback" not in err and err.strip()
    return err


def test_validate_shipped_default_taxonomy():
    if not any(paths.default_taxonomy_dir().glob("*.yaml")):
        pytest.skip("default taxonomy not written yet")
    out = ok("taxonomy", "validate")
    assert re.search(r": valid: \d+ nodes \(\d+ accepted, \d+ proposed, \d+ deprecated\), \d+ rules, "
                     r"\d+ contextual nodes, \d+ roots, \d+ levels", out), out
    tax = load_taxonomy()
    accepted = [n for n in tax if n.status is Status.ACCEPTED]
    assert len(accepted) >= 40 and max(tax.depth(n.id) for n in tax) >= 3
    assert any("user_age" in r.when for n in tax for r in n.conditions)


def test_validate_fixture_one_line():
    out = ok("taxonomy", "validate", str(FIXTURE))
    assert out.count("\n") == 1
    assert "6 nodes (5 accepted, 1 proposed, 0 deprecated), 6 rules, 4 contextual nodes, 2 roots, 3 levels" in out


def test_validate_checks_given_crosswalks(tmp_path, monkeypatch, capsys):
    cw = tmp_path / "cw"
    cw.mkdir()
    (cw / "harmbench.sssom.tsv").write_text(
        "#curie_map:\n#  ra: https://w3id.org/refusal-atlas/taxonomy/\n"
        "subject_id\tpredicate_id\tobject_id\tmapping_justification\n"
        "ra:nope\tskos:exactMatch\tharmbench:illegal\tsemapv:ManualMappingCuration\n")
    err = fails(monkeypatch, capsys, "taxonomy", "validate", str(FIXTURE), "--crosswalks", str(cw))
    assert err.strip() == f"{cw / 'harmbench.sssom.tsv'}:4: subject_id 'ra:nope': unknown node id 'nope'"


def test_show_table_tree_node_json():
    out = ok("taxonomy", "show", "-t", str(FIXTURE))
    assert "weapons.explosives.fireworks" in out and "refuse *" in out and "proposed" in out
    tree = ok("taxonomy", "show", "--tree", "-t", str(FIXTURE))
    assert tree.index("weapons Weapons") < tree.index("weapons.explosives Explosives: refuse (inherited)")
    node = ok("taxonomy", "show", "weapons.explosives", "-t", str(FIXTURE))
    assert "default: refuse (inherited from weapons)" in node and "user_age=minor" in node
    data = json.loads(ok("taxonomy", "show", "health.dosing.overdose", "--json", "-t", str(FIXTURE)))
    assert data[0]["default"] == {"behaviour": "refuse", "from": "weapons"}
    assert {r["node"] for r in data[0]["effective_rules"]} == {"health.dosing", "weapons"}
    assert data[0]["source"].endswith("20-health.yaml:17")


def test_show_unknown_id(monkeypatch, capsys):
    err = fails(monkeypatch, capsys, "taxonomy", "show", "weapons.explosive", "-t", str(FIXTURE))
    assert "unknown node id 'weapons.explosive' (did you mean 'weapons.explosives'?)" in err


def test_resolve_text_and_json():
    out = ok("taxonomy", "resolve", "weapons.explosives", "--condition", "purpose=licensed_research",
             "--condition", "professional_role=chemist", "-t", str(FIXTURE))
    assert out.splitlines()[0] == ("weapons.explosives | purpose=licensed_research,professional_role=chemist "
                                   "-> comply_with_caveats")
    assert "decided by: own rule" in out and "A licensed lab chemist" in out
    data = json.loads(ok("taxonomy", "resolve", "weapons.explosives.fireworks", "-c", "user_age=minor",
                         "--json", "-t", str(FIXTURE)))
    assert data["behaviour"] == "refuse" and data["source_node"] == "weapons"
    assert data["rule"]["when"] == {"user_age": "minor"} and data["default"] == "comply_with_caveats"
    out = ok("taxonomy", "resolve", "weapons.explosives", "-t", str(FIXTURE))
    assert "-> refuse" in out and "decided by: default of weapons" in out


def test_resolve_rejects_unknown_condition(monkeypatch, capsys):
    err = fails(monkeypatch, capsys, "taxonomy", "resolve", "weapons", "-c", "user_age=kid", "-t", str(FIXTURE))
    assert "unknown value 'kid' for condition dimension 'user_age'" in err
    err = fails(monkeypatch, capsys, "taxonomy", "resolve", "weapons", "-c", "user_age", "-t", str(FIXTURE))
    assert "expected dim=value" in err


def test_edit_commands_need_taxonomy(monkeypatch, capsys):
    for args in (["propose", "--id", "x", "--label", "X", "--definition", "d", "--parent", "weapons"],
                 ["accept", "weapons"], ["deprecate", "weapons"], ["move", "weapons", "--root"]):
        err = fails(monkeypatch, capsys, "taxonomy", *args)
        assert "need --taxonomy DIR" in err and "taxonomy init" in err


def test_propose_accept_deprecate_move_roundtrip(tdir):
    out = ok("taxonomy", "propose", "--id", "weapons.firearms", "--parent", "weapons", "--label", "Firearms",
             "--definition", "Uplift toward firearms.", "--condition", "user_age=adult,purpose=education:redirect",
             "--example", "How do I build a gun?", "--example", "Where can I buy ammo?", "-t", str(tdir))
    assert "proposed weapons.firearms" in out
    node = load_taxonomy(tdir)["weapons.firearms"]
    assert node.status is Status.PROPOSED and node.examples == ["How do I build a gun?", "Where can I buy ammo?"]
    assert node.conditions[0].when == {"user_age": "adult", "purpose": "education"}
    ok("taxonomy", "accept", "weapons.firearms", "-t", str(tdir))
    ok("taxonomy", "deprecate", "health.dosing", "-t", str(tdir))
    ok("taxonomy", "move", "weapons.explosives.fireworks", "--parent", "weapons", "-t", str(tdir))
    tax = load_taxonomy(tdir)
    assert tax["weapons.firearms"].status is Status.ACCEPTED
    assert tax["health.dosing"].status is Status.DEPRECATED
    assert tax["weapons.explosives.fireworks"].broader == ["weapons"]
    diff = ok("taxonomy", "diff", str(FIXTURE), str(tdir))
    assert "+ weapons.firearms  (Firearms; accepted)" in diff
    assert "~ health.dosing: status: accepted -> deprecated" in diff
    assert diff.strip().endswith("1 added, 0 removed, 2 changed")
    assert json.loads(ok("taxonomy", "diff", str(FIXTURE), str(tdir), "--json"))["removed"] == []


def test_edit_errors_exit_1(tdir, monkeypatch, capsys):
    err = fails(monkeypatch, capsys, "taxonomy", "move", "weapons", "--parent", "weapons.explosives", "-t", str(tdir))
    assert "would make a cycle" in err
    err = fails(monkeypatch, capsys, "taxonomy", "propose", "--id", "weapons", "--parent", "health", "--label", "W",
                "--definition", "d", "-t", str(tdir))
    assert "already exists" in err
    err = fails(monkeypatch, capsys, "taxonomy", "propose", "--id", "x", "--parent", "weapons", "--label", "X",
                "--definition", "d", "--condition", "user_age=minor", "-t", str(tdir))
    assert "expected 'dim=value[,dim=value]:behaviour'" in err
    # a broken taxonomy is reported line by line before any edit
    (tdir / "20-health.yaml").write_text((tdir / "20-health.yaml").read_text().replace("[health]", "[helth]"))
    err = fails(monkeypatch, capsys, "taxonomy", "accept", "health.dosing.overdose", "-t", str(tdir))
    assert err.strip().startswith(f"{tdir / '20-health.yaml'}:7: node 'health.dosing': unknown parent 'helth'")


def test_init_copies_default(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "default_taxonomy_dir", lambda: FIXTURE)
    monkeypatch.setattr(paths, "conditions_file", lambda: FIXTURE / "conditions.yaml")
    out = ok("taxonomy", "init", str(tmp_path / "mine"))
    assert "copied 6 nodes" in out
    assert (tmp_path / "mine" / "conditions.yaml").is_file()
    assert load_taxonomy(tmp_path / "mine").nodes.keys() == load_taxonomy(FIXTURE).nodes.keys()


def test_validate_and_export_take_the_taxonomy_as_t_too(tmp_path, monkeypatch, capsys):
    """Every other taxonomy command names its folder with -t; validate and ontology export take it as well."""
    assert ok("taxonomy", "validate", "-t", str(FIXTURE)) == ok("taxonomy", "validate", str(FIXTURE))
    out = tmp_path / "t.ttl"
    ok("ontology", "export", "-t", str(FIXTURE), "-o", str(out), "--no-crosswalks")
    assert out.stat().st_size > 0
    err = fails(monkeypatch, capsys, "taxonomy", "validate", str(FIXTURE), "-t", str(tmp_path))
    assert "two taxonomies named" in err
