"""The worked SPARQL example in docs/sparql-example.md (quoted in the README) gives exactly the output it shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refusal_atlas.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "sparql-example.md"


def block(text: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", text, flags=re.S)
    assert match, f"no ```{language} block in {DOC}"
    return match.group(1)


@pytest.mark.parametrize("doc", [DOC, ROOT / "README.md"], ids=["docs", "readme"])
def test_worked_sparql_example_output_matches_the_doc(tmp_path: Path, doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    query = tmp_path / "minors.rq"
    query.write_text(block(text, "sparql"), encoding="utf-8")
    consoles = re.findall(r"```console\n(.*?)```", text, flags=re.S)  # the README has other console blocks
    assert any("refusal-atlas ontology sparql minors.rq --format csv" in c for c in consoles)
    result = CliRunner().invoke(app, ["ontology", "sparql", str(query), "--format", "csv"])
    assert result.exit_code == 0, result.output
    expected = block(text, "csv")
    assert result.stdout == expected, (
        f"{doc.name} is out of date with the shipped taxonomy; replace its csv block with:\n"
        + result.stdout)
    assert len(expected.splitlines()) > 5  # a real answer, not an empty table
