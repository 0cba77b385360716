"""Field-level taxonomy diffs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from refusal_atlas.taxonomy import edit
from refusal_atlas.taxonomy.diff import FieldChange, diff_taxonomies
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import ConditionRule, Node, Taxonomy

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"


def test_identical_is_empty():
    a = load_taxonomy(FIXTURE)
    result = diff_taxonomies(a, load_taxonomy(FIXTURE))
    assert result.empty and result.lines() == []


def test_added_removed_changed_after_edits(tmp_path):
    b_dir = tmp_path / "b"
    shutil.copytree(FIXTURE, b_dir)
    edit.propose(b_dir, "weapons.firearms", "weapons", "Firearms", "Guns.")
    edit.accept(b_dir, "health.dosing.overdose")
    edit.move(b_dir, "weapons.explosives.fireworks", "weapons")
    text = (b_dir / "20-health.yaml").read_text()
    (b_dir / "20-health.yaml").write_text(text.replace("expect: redirect", "expect: refuse"))
    result = diff_taxonomies(load_taxonomy(FIXTURE), load_taxonomy(b_dir))
    assert [n.id for n in result.added] == ["weapons.firearms"] and result.removed == ()
    changed = {c.id: c.changes for c in result.changed}
    assert changed["health.dosing.overdose"] == (FieldChange("status", "proposed", "accepted"),)
    assert changed["weapons.explosives.fireworks"] == (
        FieldChange("broader", ["weapons.explosives"], ["weapons"]),)
    assert changed["health.dosing"] == (FieldChange("conditions[user_age=minor]", "redirect", "refuse"),)
    lines = result.lines()
    assert "+ weapons.firearms  (Firearms; proposed)" in lines
    assert "~ health.dosing.overdose: status: proposed -> accepted" in lines
    assert json.loads(json.dumps(result.to_dict()))["removed"] == []


def test_rules_matched_by_when_not_order():
    r1 = ConditionRule(when={"user_age": "minor", "purpose": "education"}, expect="refuse")
    r2 = ConditionRule(when={"purpose": "education"}, expect="comply", rationale="ok")
    a = Taxonomy(nodes={"n": Node(id="n", label="n", definition="d", expect="refuse", conditions=[r1, r2])})
    b_rule = ConditionRule(when={"purpose": "education", "user_age": "minor"}, expect="refuse")
    b = Taxonomy(nodes={"n": Node(id="n", label="n", definition="d", expect="refuse",
                                  conditions=[r2.model_copy(update={"rationale": "fine"}), b_rule])})
    [change] = diff_taxonomies(a, b).changed
    assert change.changes == (FieldChange("conditions[purpose=education].rationale", "ok", "fine"),)
    c = Taxonomy(nodes={"n": Node(id="n", label="n", definition="d", expect="refuse", conditions=[r1])})
    [change] = diff_taxonomies(a, c).changed
    assert change.changes == (FieldChange("conditions[purpose=education]", "comply", None),)
    result = diff_taxonomies(a, Taxonomy())
    assert [n.id for n in result.removed] == ["n"] and "- n  (n)" in result.lines()
