"""`taxonomy rename OLD NEW`: every reference follows, formatting is kept, bad renames change nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli.helpers import one_line_error, run_main
from refusal_atlas import io as atlas_io
from refusal_atlas import paths
from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy import rename as rename_mod
from refusal_atlas.taxonomy.crosswalk import check_crosswalks, load_crosswalks
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.rename import plan_rename, rename
from refusal_atlas.taxonomy.resolve import resolve

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"

CROSSWALK = (
    "#curie_map:\n#  ra: https://w3id.org/refusal-atlas/taxonomy/\n"
    "#  llamaguard3: https://w3id.org/refusal-atlas/external/llamaguard3/\n"
    "subject_id\tsubject_label\tpredicate_id\tobject_id\tobject_label\tmapping_justification\tcomment\n"
    "ra:weapons\tWeapons\tskos:closeMatch\tllamaguard3:S9\tIndiscriminate Weapons\tsemapv:ManualMappingCuration\t\n"
    "ra:weapons.explosives\tExplosives\tskos:broadMatch\tllamaguard3:S9\tIndiscriminate Weapons\t"
    "semapv:ManualMappingCuration\tra:weapons in a comment stays\n"
    "ra:health\tHealth\tskos:closeMatch\tllamaguard3:S6\tSpecialized Advice\tsemapv:ManualMappingCuration\t\n"
)


@pytest.fixture
def xdir(tdir: Path) -> Path:
    """The fixture taxonomy with its own crosswalks folder, as `taxonomy init` makes it."""
    (tdir / "crosswalks").mkdir()
    (tdir / "crosswalks" / "llamaguard3.sssom.tsv").write_text(CROSSWALK, encoding="utf-8")
    return tdir


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rename_with_descendants_updates_ids_parents_and_crosswalks(xdir: Path):
    before = load_taxonomy(xdir)
    weapons_text = (xdir / "10-weapons.yaml").read_text()
    plan = rename(xdir, "weapons", "arms")
    assert plan.ids == {"weapons": "arms", "weapons.explosives": "arms.explosives",
                        "weapons.explosives.fireworks": "arms.explosives.fireworks"}
    after = load_taxonomy(xdir)
    assert set(after.nodes) == {plan.ids.get(n, n) for n in before.nodes}
    assert after["health.dosing.overdose"].broader == ["health.dosing", "arms"]  # a reference from another file
    assert after["arms.explosives.fireworks"].broader == ["arms.explosives"]
    # the policy is unchanged: every node resolves as before in every context its rules name
    for old, node in before.nodes.items():
        for rule in [None, *node.conditions]:
            ctx = dict(rule.when) if rule else {}
            assert resolve(after, plan.ids.get(old, old), ctx).behaviour == resolve(before, old, ctx).behaviour
    # comments, blank lines and flow style are kept: only the id tokens changed
    expected = (weapons_text.replace("id: weapons", "id: arms").replace("[weapons", "[arms"))
    assert (xdir / "10-weapons.yaml").read_text() == expected
    # crosswalk rows: only the subject_id cell changes (a mention in a comment cell stays)
    assert (xdir / "crosswalks" / "llamaguard3.sssom.tsv").read_text() == (
        CROSSWALK.replace("ra:weapons\t", "ra:arms\t").replace("ra:weapons.explosives\t", "ra:arms.explosives\t"))
    mappings = load_crosswalks(xdir / "crosswalks")
    assert not check_crosswalks(after, mappings)
    assert {m.node_id for m in mappings} == {"arms", "arms.explosives", "health"}
    kinds = {(c.key, c.old) for c in plan.changes}
    assert ("subject_id", "ra:weapons.explosives") in kinds and ("broader", "weapons") in kinds


def test_rename_keeps_comments_quotes_and_crlf(tmp_path: Path):
    root = tmp_path / "t"
    root.mkdir()
    shutil.copy(FIXTURE / "conditions.yaml", root / "conditions.yaml")
    text = ("# head\r\nnodes:\r\n  - id: \"old\"   # quoted, with a comment\r\n    label: Old\r\n"
            "    definition: A root.\r\n    expect: refuse\r\n\r\n  # about the child\r\n  - id: old.kid\r\n"
            "    label: Kid\r\n    definition: A child.\r\n    broader:\r\n      - old  # block style\r\n")
    (root / "a.yaml").write_bytes(text.encode())
    rename(root, "old", "new_name")
    assert (root / "a.yaml").read_bytes().decode() == (
        text.replace('"old"', '"new_name"').replace("old.kid", "new_name.kid").replace("- old ", "- new_name "))


def test_dry_run_writes_nothing_and_lists_every_change(xdir: Path, monkeypatch, capsys):
    before = snapshot(xdir)
    code, out, err = run_main(monkeypatch, capsys, "taxonomy", "rename", "weapons.explosives", "weapons.blasts",
                              "-t", str(xdir), "--dry-run")
    assert code == 0, err
    assert snapshot(xdir) == before
    lines = out.strip().splitlines()
    assert f"{xdir / '10-weapons.yaml'}:14: id: weapons.explosives -> weapons.blasts" in lines
    assert f"{xdir / '10-weapons.yaml'}:30: broader: weapons.explosives -> weapons.blasts" in lines
    assert f"{xdir / 'crosswalks' / 'llamaguard3.sssom.tsv'}:6: subject_id: ra:weapons.explosives -> " \
           "ra:weapons.blasts" in lines
    assert lines[-1].startswith("would rename weapons.explosives -> weapons.blasts and 1 node(s) below it: "
                                "4 reference(s) in 2 file(s)") and lines[-1].endswith("nothing written")


@pytest.mark.parametrize(("old", "new", "message"), [
    ("health", "weapons", "node 'weapons' already exists"),
    ("weapons", "health", "node 'health' already exists"),
    ("nope", "x", "cannot rename 'nope': no such node id"),
    ("helth", "x", "no such node id (did you mean 'health'?)"),
    ("health", "Health", "may contain only lower-case"),
    ("health", "[bold]x", "'[bold]x' may contain only lower-case"),  # shown as typed, not as markup
    ("health", "<script>alert(1)</script>", "must not contain '/'"),
    ("health", "a/../b", "must not contain '/'"),
    ("health", "health", "the new id is the same"),
])
def test_bad_renames_are_one_line_errors_and_change_nothing(xdir, monkeypatch, capsys, old, new, message):
    before = snapshot(xdir)
    line = one_line_error(monkeypatch, capsys, "taxonomy", "rename", old, new, "-t", str(xdir))
    assert message in line, line
    assert snapshot(xdir) == before


def test_a_descendant_collision_is_refused(xdir, monkeypatch, capsys):
    (xdir / "30-arms.yaml").write_text("nodes:\n  - id: arms.explosives\n    label: Other\n"
                                       "    definition: Another node.\n    expect: refuse\n")
    before = snapshot(xdir)
    line = one_line_error(monkeypatch, capsys, "taxonomy", "rename", "weapons", "arms", "-t", str(xdir))
    assert "'weapons.explosives' would become 'arms.explosives'" in line
    assert f"{xdir / '30-arms.yaml'}:2" in line
    assert snapshot(xdir) == before


def test_broken_yaml_is_reported_before_any_change(xdir, monkeypatch, capsys):
    (xdir / "20-health.yaml").write_text((xdir / "20-health.yaml").read_text().replace("  - id: health.dosing\n",
                                                                                      "  - id: [health.dosing\n"))
    before = snapshot(xdir)
    code, _, err = run_main(monkeypatch, capsys, "taxonomy", "rename", "weapons", "arms", "-t", str(xdir))
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"{xdir / '20-health.yaml'}:"), err
    assert snapshot(xdir) == before


def test_a_failed_write_puts_every_file_back(xdir, monkeypatch):
    before = snapshot(xdir)
    real = atlas_io.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(rename_mod, "atomic_write_bytes", flaky)
    monkeypatch.setattr(rename_mod, "write_text_like",
                        lambda path, text: flaky(path, text.encode()))
    with pytest.raises(AtlasError, match="undone in every file"):
        rename(xdir, "weapons", "arms")
    assert snapshot(xdir) == before
    assert not [p for p in xdir.rglob("*.tmp")]


def test_an_extra_crosswalk_folder_is_updated_and_the_shipped_one_never(tdir, tmp_path, monkeypatch, capsys):
    extra = tmp_path / "xw"
    extra.mkdir()
    (extra / "a.sssom.tsv").write_text(CROSSWALK, encoding="utf-8")
    code, _out, err = run_main(monkeypatch, capsys, "taxonomy", "rename", "health", "medical", "-t", str(tdir),
                              "--crosswalks", str(extra))
    assert code == 0, err
    assert "ra:medical\tHealth" in (extra / "a.sssom.tsv").read_text()
    line = one_line_error(monkeypatch, capsys, "taxonomy", "rename", "medical", "health", "-t", str(tdir),
                          "--crosswalks", str(paths.crosswalk_dir()))
    assert "shipped default taxonomy" in line


def test_the_shipped_taxonomy_is_never_renamed(monkeypatch, capsys):
    line = one_line_error(monkeypatch, capsys, "taxonomy", "rename", "cyber", "cyber2", "-t",
                          str(paths.default_taxonomy_dir()))
    assert "taxonomy init" in line


def test_plan_names_the_missing_crosswalks_folder(tdir):
    assert "no crosswalks folder" in plan_rename(tdir, "health", "medical").summary()
