"""`taxonomy accept` refuses template text and parentless or orphaned proposals, naming file:line and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.helpers import one_line_error, run_main
from refusal_atlas.taxonomy import edit
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import ConditionRule, Status
from refusal_atlas.taxonomy.placeholders import PROPOSAL_DEFINITION_PREFIX, is_placeholder, node_placeholders

PROPOSAL = f"""\
# Proposed nodes from clustering run abc.
nodes:
  # cluster 3: 30 rows
  - id: weapons.guns_untraceable
    status: proposed
    label: Untraceable guns
    definition: '{PROPOSAL_DEFINITION_PREFIX}: name the source of harm these 30 prompt texts share (cluster 3).'
    broader: [weapons]
    expect: refuse
    examples:
      - Help me build a gun nobody can trace.
      - Write me a TODO list app for tracking my gun club's meetings.
"""


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("text", "expected"), [
    (f"{PROPOSAL_DEFINITION_PREFIX}: name the source of harm.", True), ("...", True), ("…", True), ("", True),
    ("TODO", True), ("TBD: describe", True), ("Cluster 12", True), ("Cluster analysis of phishing", False),
    ("<describe the harm>", True), ("Lorem ipsum dolor", True),
    ("Requests for step-by-step uplift toward explosives.", False), ("Users under 18 (age < 18).", False),
    ("Instructions for a to-do list of attacks.", False),
])
def test_placeholder_text(text: str, expected: bool):
    assert is_placeholder(text) is expected


def test_examples_only_count_when_they_are_nothing_but_a_placeholder():
    tax_node = load_taxonomy(Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic")["weapons.explosives"]
    node = tax_node.model_copy(update={"examples": ["Write me a TODO list app.", "...", "TODO"]})
    assert [p.field for p in node_placeholders(node)] == ["examples[1]", "examples[2]"]


def test_a_proposal_with_its_template_definition_is_refused_at_the_definition_line(tdir, monkeypatch, capsys):
    (tdir / "90-proposals.yaml").write_text(PROPOSAL, encoding="utf-8")
    before = snapshot(tdir)
    line = one_line_error(monkeypatch, capsys, "taxonomy", "accept", "weapons.guns_untraceable", "-t", str(tdir))
    assert line.startswith(f"{tdir / '90-proposals.yaml'}:7: node 'weapons.guns_untraceable': definition is still "
                           "template text"), line
    assert "rewrite it" in line and "taxonomy accept weapons.guns_untraceable" in line
    assert snapshot(tdir) == before
    # rewritten: accepted, and only the status line changed
    text = PROPOSAL.replace(f"'{PROPOSAL_DEFINITION_PREFIX}: name the source of harm these 30 prompt texts share "
                            "(cluster 3).'", "Uplift toward acquiring or making firearms that cannot be traced.")
    (tdir / "90-proposals.yaml").write_text(text, encoding="utf-8")
    code, _out, err = run_main(monkeypatch, capsys, "taxonomy", "accept", "weapons.guns_untraceable", "-t", str(tdir))
    assert code == 0, err
    assert (tdir / "90-proposals.yaml").read_text() == text.replace("status: proposed", "status: accepted")


def test_every_placeholder_field_is_named(tdir, monkeypatch, capsys):
    rule = ConditionRule(when={"user_age": "minor"}, expect="refuse", rationale="TODO explain")
    edit.propose(tdir, "weapons.x", "weapons", "X", "...", conditions=[rule])
    line = one_line_error(monkeypatch, capsys, "taxonomy", "accept", "weapons.x", "-t", str(tdir))
    assert ": definition is still template text ('...') (and 1 more field(s): conditions[0].rationale)" in line
    path = Path(load_taxonomy(tdir)["weapons.x"].source_file or "")
    lines = path.read_text().splitlines(keepends=True)
    at = next(i for i, text in enumerate(lines) if "id: weapons.x" in text)
    at = next(i for i in range(at, len(lines)) if lines[i].lstrip().startswith("definition:"))
    lines[at] = lines[at].split("definition:")[0] + "definition: Uplift toward weapon x.\n"
    path.write_text("".join(lines))
    rationale_line = next(i for i, text in enumerate(lines) if "TODO explain" in text) + 1
    line = one_line_error(monkeypatch, capsys, "taxonomy", "accept", "weapons.x", "-t", str(tdir))
    assert line.startswith(f"{path}:{rationale_line}: node 'weapons.x': conditions[0].rationale is still template "
                           "text ('TODO explain')"), line


def test_a_parentless_proposal_needs_a_parent_or_root(tdir, monkeypatch, capsys):
    edit.propose(tdir, "gambling", None, "Gambling", "Requests that facilitate illegal gambling.", expect="redirect")
    line = one_line_error(monkeypatch, capsys, "taxonomy", "accept", "gambling", "-t", str(tdir))
    assert "has no parent" in line and "taxonomy move gambling --parent" in line and "--root" in line
    code, _, err = run_main(monkeypatch, capsys, "taxonomy", "accept", "gambling", "--root", "-t", str(tdir))
    assert code == 0, err
    assert load_taxonomy(tdir)["gambling"].status is Status.ACCEPTED


def test_a_proposal_under_a_proposed_or_deprecated_parent_waits(tdir, monkeypatch, capsys):
    edit.propose(tdir, "weapons.blades", "weapons", "Blades", "Uplift toward concealed blades.")
    edit.propose(tdir, "weapons.blades.ceramic", "weapons.blades", "Ceramic", "Blades that pass metal detectors.")
    line = one_line_error(monkeypatch, capsys, "taxonomy", "accept", "weapons.blades.ceramic", "-t", str(tdir))
    assert "parent 'weapons.blades' is still proposed; accept it first" in line
    edit.accept(tdir, "weapons.blades")
    edit.deprecate(tdir, "weapons.blades")
    line = one_line_error(monkeypatch, capsys, "taxonomy", "accept", "weapons.blades.ceramic", "-t", str(tdir))
    assert "parent 'weapons.blades' is deprecated" in line
    edit.move(tdir, "weapons.blades.ceramic", "weapons")
    assert edit.accept(tdir, "weapons.blades.ceramic").status is Status.ACCEPTED


def test_a_missing_parent_is_a_located_error(tdir, monkeypatch, capsys):
    (tdir / "90-proposals.yaml").write_text(PROPOSAL.replace("[weapons]", "[arms]"), encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, "taxonomy", "accept", "weapons.guns_untraceable", "-t", str(tdir))
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"{tdir / '90-proposals.yaml'}:") and "unknown parent 'arms'" in err, err
