"""Validation: planted answers against verdicts, trusted rules, the README table, the command."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from refusal_atlas.atlas.pipeline_findings import shipped_validation
from refusal_atlas.atlas.verdict_figures import Finding
from refusal_atlas.atlas.verdict_rules import INCONCLUSIVE, NO_REFUSAL, SEPARABLE, SHARED, finding
from refusal_atlas.atlas.verdict_validation import Check as _Check
from refusal_atlas.atlas.verdict_validation import (
    check_base,
    check_sae,
    check_separable,
    check_shared,
    findings_of,
    markdown_table,
    summary,
)
from refusal_atlas.atlas.verdict_validation import trusted_rules as _trusted_rules
from refusal_atlas.atlas.verdicts import load_trusted_rules as _load_trusted_rules

TRUTH = {"branches": {"cyber": {"band": [9, 17]}, "weapons": {"band": [20, 27]}}}


def _f(question: str, subject: str, verdict: str) -> Finding:
    return finding(question, subject, verdict, "synthetic")


def test_separable_truth_agrees_only_with_the_planted_answers():
    good = [_f("shared-vs-separable", "cyber and weapons", SEPARABLE),
            _f("where-it-acts", "cyber", "acts in blocks 6-11, 15-17"),
            _f("where-it-acts", "weapons", "acts in blocks 24-26"),
            _f("shared-vs-separable", "fraud", NO_REFUSAL)]
    checks = check_separable(good, TRUTH)
    assert len(checks) == 3 and all(c.agrees for c in checks)
    bad = [_f("shared-vs-separable", "cyber and weapons", SHARED), _f("where-it-acts", "cyber", "acts in blocks 20-25"),
           _f("where-it-acts", "weapons", INCONCLUSIVE), _f("shared-vs-separable", "fraud", INCONCLUSIVE)]
    assert not any(c.agrees for c in check_separable(bad, TRUTH))
    # a band that meets its own planted band but spills into the other's does not localise the component
    spill = check_separable([_f("where-it-acts", "cyber", "acts in blocks 9-20")], TRUTH)
    assert [c.agrees for c in spill if c.subject == "cyber"] == [False]
    # planted bands are [lo, hi): block 17 is outside cyber's band 9..16
    edge = check_separable([_f("where-it-acts", "cyber", "acts in blocks 17-19")], TRUTH)
    assert [c.agrees for c in edge if c.subject == "cyber"] == [False]
    assert not any(c.agrees for c in check_separable([], TRUTH))  # nothing measured is not agreement


def test_base_and_shared_checks_and_trusted_rules():
    base = check_base([_f(q, "model", NO_REFUSAL) for q in ("where-it-acts", "harm-vs-refusal")])
    shared = check_shared([_f("shared-vs-separable", "a and b", SHARED), _f("shared-vs-separable", "a and c", SHARED)])
    sep = check_separable([_f("shared-vs-separable", "cyber and weapons", SEPARABLE),
                           _f("where-it-acts", "cyber", INCONCLUSIVE)], TRUTH)
    s = summary([*base, *shared, *sep])
    # restoration-band disagreed once; base findings are read under each question's rule
    assert "component-removal" in s["trusted_rules"] and "restoration-band" not in s["trusted_rules"]
    assert not s["all_agree"] and s["per_model"]["shared"] == {"checks": 2, "agree": 2}
    assert not check_shared([])[0].agrees and not check_base([])[0].agrees
    table = markdown_table([*shared, *sep])
    assert table.startswith("| model | question |") and "**no**" in table and table.count("\n") == 2 + 2 + 3


def test_findings_round_trip(tmp_path):
    f = _f("shared-vs-separable", "a and b", SHARED)
    (tmp_path / "findings.json").write_text(json.dumps({"findings": [f.to_dict()]}))
    (back,) = findings_of(tmp_path / "findings.json")
    assert back.verdict == SHARED and back.subject == "a and b"


def test_validate_rejects_an_unknown_budget_in_one_line(tmp_path):
    from refusal_atlas.cli.validate import register
    from refusal_atlas.errors import AtlasError

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps `validate` a named sub-command
        pass

    result = CliRunner().invoke(app, ["validate", "-o", str(tmp_path), "--budget", "tiny"])
    assert isinstance(result.exception, AtlasError) and "--budget 'tiny'" in str(result.exception)


@pytest.mark.slow
@pytest.mark.real_model
def test_reduced_validation_runs_and_the_base_model_has_nothing_to_analyse(tmp_path):
    from rich.console import Console

    from refusal_atlas.cli.validate import run_validation

    result = run_validation(tmp_path, reduced=True, seed=0, threads=None, console=Console(stderr=True))
    base = [c for c in result["checks"] if c["model"] == "base"]
    assert base and all(c["agrees"] for c in base)
    assert result["planted"]["separable"]["verification"]["verified"]


def test_sae_check_reads_the_planted_pair_against_its_chance_bound():
    """Shared organism: the pair's K* sets must pass the chance bound; separable: they must not (either order of
    the pair in the table); a missing table or pair never agrees."""
    pairs = pd.DataFrame([
        {"node_a": "cyber", "node_b": "weapons", "jaccard": 0.111, "ci_low": 0.026, "ci_high": 0.111,
         "chance_95": 0.143, "overlapping": False},
        {"node_a": "cyber", "node_b": "fraud", "jaccard": 0.25, "ci_low": 0.14, "ci_high": 0.29, "chance_95": 0.143,
         "overlapping": True}])
    sep = check_sae("separable", pairs, "weapons", "cyber", overlap=False)
    assert sep.agrees and sep.rule == "sae-jaccard" and "not above the chance bound 0.143" in sep.verdict
    assert not check_sae("shared", pairs, "cyber", "weapons", overlap=True).agrees
    shared = check_sae("shared", pairs, "fraud", "cyber", overlap=True)
    assert shared.agrees and "0.250 (95% CI 0.140 to 0.290) above" in shared.verdict
    for missing in (check_sae("shared", None, "cyber", "weapons", overlap=True),
                    check_sae("separable", pairs, "cyber", "hate", overlap=False)):
        assert not missing.agrees and missing.verdict == "(not measured)"


def test_validate_rejects_an_unknown_model_for_only_in_one_line(tmp_path):
    from refusal_atlas.cli.validate import register
    from refusal_atlas.errors import AtlasError

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:
        pass

    result = CliRunner().invoke(app, ["validate", "-o", str(tmp_path), "--only", "gpt"])
    assert isinstance(result.exception, AtlasError) and "--only 'gpt'" in str(result.exception)
    assert not (tmp_path / "organisms").exists()  # nothing was built


def test_the_shipped_record_trusts_exactly_the_rules_its_checks_support():
    """`run` reads data/validation.json as `validate` writes it (trusted rules under "summary")."""
    path = shipped_validation()
    assert path is not None
    record = json.loads(path.read_text())
    expected = _trusted_rules([_Check(**c) for c in record["checks"]])
    assert expected and _load_trusted_rules(path) == expected
