"""Comment-preserving edits (propose / accept / deprecate / move) and atomic writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from refusal_atlas import io as atlas_io
from refusal_atlas import paths
from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.taxonomy import edit, yamlio
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Behaviour, ConditionRule, Status
from refusal_atlas.taxonomy.resolve import resolve

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"

COMMENTED = """\
# header comment
nodes:
  - id: a
    label: A
    definition: Root A.  # inline on a
    expect: refuse

  # comment introducing b
  - id: b
    label: B
    definition: Root B.
    expect: comply
    conditions:
      - when: {user_age: minor}
        expect: refuse  # inline rule

  # comment introducing c
  - id: c
    label: C
    definition: Child of b.
    broader:
      - b
# trailing file comment
"""


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    root = tmp_path / "commented"
    root.mkdir()
    shutil.copy(FIXTURE / "conditions.yaml", root / "conditions.yaml")
    (root / "a.yaml").write_text(COMMENTED)
    return root


def comments(text: str) -> list[str]:
    return [line.split("#", 1)[1].strip() for line in text.splitlines() if "#" in line]


def test_round_trip_without_change_is_byte_identical(tdir):
    for f in sorted(tdir.glob("*.yaml")):
        data, yaml = yamlio.load_for_edit(f)
        assert yamlio.dump_to_text(yaml, data) == f.read_text()


def test_propose_writes_into_parent_file_keeping_comments_and_order(tdir):
    before = (tdir / "10-weapons.yaml").read_text()
    node = edit.propose(tdir, "weapons.firearms", "weapons", "Firearms", "Uplift toward making firearms.",
                        conditions=["user_age=adult,purpose=education:comply_with_caveats"],
                        examples=["How is a rifle barrel rifled?"], kind="capability_uplift")
    after = (tdir / "10-weapons.yaml").read_text()
    assert node.status is Status.PROPOSED and node.source_file == str(tdir / "10-weapons.yaml")
    assert after.startswith(before)  # appended after the parent's subtree, nothing above touched
    assert comments(after) == comments(before)
    tax = load_taxonomy(tdir)
    new = tax["weapons.firearms"]
    assert new.status is Status.PROPOSED and new.broader == ["weapons"] and new.kind == "capability_uplift"
    assert new.conditions == [ConditionRule(when={"user_age": "adult", "purpose": "education"},
                                            expect=Behaviour.COMPLY_WITH_CAVEATS)]
    assert list(tax.nodes).index("weapons.firearms") == 3  # after weapons.explosives.fireworks
    assert resolve(tax, "weapons.firearms", {}).behaviour is Behaviour.REFUSE  # inherits the default
    assert "- id: weapons.firearms\n    status: proposed\n" in after  # file's own indentation


def test_propose_in_the_middle_keeps_comment_with_its_node(cdir):
    edit.propose(cdir, "a.x", "a", "AX", "Child of a.")
    text = (cdir / "a.yaml").read_text()
    assert comments(text) == comments(COMMENTED)
    # the new node sits after a, and "comment introducing b" still directly precedes b
    assert text.index("- id: a.x") < text.index("# comment introducing b") < text.index("- id: b")
    assert "definition: Root A.  # inline on a" in text
    assert list(load_taxonomy(cdir).nodes) == ["a", "a.x", "b", "c"]


def test_propose_refuses_duplicates_and_bad_input(tdir):
    before = {f: f.read_bytes() for f in tdir.iterdir()}
    with pytest.raises(AtlasError, match=r"already exists \(.*10-weapons.yaml:3\)"):
        edit.propose(tdir, "weapons", "health", "W", "dup")
    with pytest.raises(AtlasError, match="unknown parent 'nope'"):
        edit.propose(tdir, "x", "nope", "X", "d")
    with pytest.raises(AtlasError, match="must not contain '/'"):
        edit.propose(tdir, "a/b", "weapons", "X", "d")
    with pytest.raises(AtlasError, match="unknown behaviour 'deny'"):
        edit.propose(tdir, "x", "weapons", "X", "d", expect="deny")
    with pytest.raises(AtlasError, match="unknown value 'kid'"):
        edit.propose(tdir, "x", "weapons", "X", "d", conditions=["user_age=kid:refuse"])
    with pytest.raises(ValidationErrors, match="root node 'x' has no `expect`"):
        edit.propose(tdir, "x", None, "X", "d")
    assert {f: f.read_bytes() for f in tdir.iterdir()} == before


def test_propose_root_goes_to_last_file(tdir):
    edit.propose(tdir, "privacy", None, "Privacy", "Personal data about others.", expect="redirect")
    tax = load_taxonomy(tdir)
    assert tax["privacy"].source_file == str(tdir / "20-health.yaml") and tax["privacy"].expect is Behaviour.REDIRECT


def test_propose_refuses_invalid_taxonomy_first(tdir):
    (tdir / "20-health.yaml").write_text((tdir / "20-health.yaml").read_text().replace("[health]", "[helth]"))
    with pytest.raises(ValidationErrors, match="unknown parent 'helth'"):
        edit.propose(tdir, "weapons.x", "weapons", "X", "d")


def test_accept_and_deprecate_keep_everything_else(tdir):
    before = (tdir / "20-health.yaml").read_text()
    edit.accept(tdir, "health.dosing.overdose")
    after = (tdir / "20-health.yaml").read_text()
    assert after == before.replace("status: proposed", "status: accepted")
    edit.deprecate(tdir, "health.dosing")
    text = (tdir / "20-health.yaml").read_text()
    assert "  - id: health.dosing\n    status: deprecated\n    label: Medication dosing\n" in text
    assert comments(text) == comments(before)
    tax = load_taxonomy(tdir)
    assert tax["health.dosing"].status is Status.DEPRECATED
    assert tax["health.dosing.overdose"].status is Status.ACCEPTED
    # already accepted: no write at all
    mtime = (tdir / "10-weapons.yaml").stat().st_mtime_ns
    assert edit.accept(tdir, "weapons").status is Status.ACCEPTED
    assert (tdir / "10-weapons.yaml").stat().st_mtime_ns == mtime


def test_move_changes_broader_and_refuses_cycles(tdir, cdir):
    edit.move(tdir, "weapons.explosives.fireworks", "weapons")
    tax = load_taxonomy(tdir)
    assert tax["weapons.explosives.fireworks"].broader == ["weapons"]
    assert "broader: [weapons]\n    expect: comply_with_caveats" in (tdir / "10-weapons.yaml").read_text()
    before = (tdir / "10-weapons.yaml").read_text()
    with pytest.raises(AtlasError, match="would make a cycle"):
        edit.move(tdir, "weapons", "weapons.explosives")
    with pytest.raises(AtlasError, match="would make a cycle"):
        edit.move(tdir, "weapons", "weapons")
    assert (tdir / "10-weapons.yaml").read_text() == before
    # block-style broader, last key of the node, with the next node's comment after it
    edit.move(cdir, "c", ["a", "b"])
    text = (cdir / "a.yaml").read_text()
    assert comments(text) == comments(COMMENTED)
    assert load_taxonomy(cdir)["c"].broader == ["a", "b"]


def test_move_to_root_needs_expect(cdir):
    with pytest.raises(ValidationErrors, match="root node 'c' has no `expect`"):
        edit.move(cdir, "c", None)


def test_status_inserted_keeps_following_comment_in_place(cdir):
    edit.deprecate(cdir, "b")
    text = (cdir / "a.yaml").read_text()
    assert "  - id: b\n    status: deprecated\n" in text
    assert text.index("expect: refuse  # inline rule") < text.index("# comment introducing c") < text.index("- id: c")


def test_default_taxonomy_is_not_edited(monkeypatch, tdir):
    monkeypatch.setattr(paths, "default_taxonomy_dir", lambda: tdir)
    with pytest.raises(AtlasError, match="shipped default taxonomy"):
        edit.accept(tdir, "health.dosing.overdose")


def test_failed_write_leaves_original_intact(tdir, monkeypatch):
    target = tdir / "20-health.yaml"
    before = target.read_bytes()

    class Boom(RuntimeError):
        pass

    def crash(fd):
        raise Boom("disk full")  # the temporary file holds the new text but was never synced

    monkeypatch.setattr(atlas_io.os, "fsync", crash)
    with pytest.raises(Boom):
        edit.propose(tdir, "health.diet", "health", "Diet", "Diet advice.")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tdir.iterdir()) == sorted(p.name for p in FIXTURE.iterdir())  # no temp left


def test_failed_rename_leaves_original_intact(tdir, monkeypatch):
    target = tdir / "10-weapons.yaml"
    before = target.read_bytes()

    def no_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(atlas_io.os, "replace", no_replace)
    with pytest.raises(OSError, match="rename failed"):
        edit.deprecate(tdir, "weapons.explosives")
    assert target.read_bytes() == before
    assert not [p for p in tdir.iterdir() if p.name.endswith(".tmp")]


def test_copy_default(monkeypatch, tmp_path, tdir):
    monkeypatch.setattr(paths, "default_taxonomy_dir", lambda: tdir)
    monkeypatch.setattr(paths, "conditions_file", lambda: tdir / "conditions.yaml")
    dest = edit.copy_default(tmp_path / "mine")
    assert load_taxonomy(dest).nodes.keys() == load_taxonomy(tdir).nodes.keys()
    with pytest.raises(AtlasError, match="not empty"):
        edit.copy_default(dest)


def test_broader_added_and_removed_as_last_key_keeps_next_comment(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    shutil.copy(FIXTURE / "conditions.yaml", root / "conditions.yaml")
    original = ("nodes:\n  - id: a\n    label: A\n    expect: refuse\n    definition: Root A.  # inl\n\n"
                "  # about b\n  - id: b\n    label: B\n    expect: comply\n    definition: Root B.\n\n"
                "  # about c\n  - id: c\n    label: C\n    definition: C.\n    broader: [a]\n")
    (root / "a.yaml").write_text(original)
    edit.move(root, "b", "a")
    text = (root / "a.yaml").read_text()
    assert "    definition: Root B.\n    broader: [a]\n\n  # about c\n  - id: c\n" in text
    edit.move(root, "b", None)
    assert (root / "a.yaml").read_text() == original
