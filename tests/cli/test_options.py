"""Numeric options: non-finite or out-of-range values are usage errors (exit 2) at parse time."""

from __future__ import annotations

import pytest
import typer

from cli.helpers import run_main
from refusal_atlas.cli.options import number


def test_number_accepts_bounds_and_refuses_nan_inf_and_outside():
    check = number(0.0, 1.0)
    assert check(0.0) == 0.0 and check(1.0) == 1.0 and check(None) is None
    for bad in (float("nan"), float("inf"), -0.1, 1.5):
        with pytest.raises(typer.BadParameter):
            check(bad)
    strictly = number(0.0, above=True)
    assert strictly(1e-9) == 1e-9
    with pytest.raises(typer.BadParameter, match="must be > 0"):
        strictly(0.0)


@pytest.mark.parametrize(("args", "option"), [
    (["curate", "map", "{tmp}", "--min-share", "nan"], "--min-share"),
    (["curate", "map", "{tmp}", "--min-similarity", "7"], "--min-similarity"),
    (["curate", "cluster", "{tmp}/c.csv", "-o", "{tmp}/o", "--min-cluster-fraction", "nan"], "--min-cluster-fraction"),
    (["curate", "collect", "-p", "{tmp}/c.csv", "-o", "{tmp}/o.parquet", "--batch-size", "0"], "--batch-size"),
    (["curate", "collect", "-p", "{tmp}/c.csv", "-o", "{tmp}/o.parquet", "--top-p", "0"], "--top-p"),
    (["directions", "overlap", "{tmp}", "-o", "{tmp}/o", "--min-overlap", "inf"], "--min-overlap"),
    (["sae", "train", "{tmp}/a.safetensors", "-o", "{tmp}/o", "--lr", "-1"], "--lr"),
    (["organism", "build", "-o", "{tmp}/o", "--epochs", "0"], "--epochs"),
    (["ontology", "sparql", "ASK {}", "--timeout", "nan"], "--timeout"),
])
def test_bad_numbers_stop_before_any_work(monkeypatch, capsys, tmp_path, args, option):
    (tmp_path / "c.csv").write_text("prompt,response\na,b\n", encoding="utf-8")
    code, out, err = run_main(monkeypatch, capsys, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and f"Invalid value for '{option}'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv"]  # nothing written
