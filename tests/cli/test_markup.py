"""Class 3: untrusted text is never rich markup; help text is printed literally."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.helpers import run_main
from refusal_atlas.cli import app
from refusal_atlas.taxonomy import edit

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"
HOSTILE_LABEL = "Evil [/] [link=https://attacker.example]here[/link] [bold red]x :smile:"
HOSTILE_DEFINITION = "Defined as [/bold] [link=https://attacker.example]click[/link]."


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    root = tmp_path / "tax"
    shutil.copytree(FIXTURE, root)
    edit.propose(root, "health.hostile", "health", HOSTILE_LABEL, HOSTILE_DEFINITION)
    return root


@pytest.mark.parametrize("extra", [[], ["--tree"], ["health.hostile"], ["health", "--tree"]])
def test_taxonomy_show_prints_labels_literally(monkeypatch, capsys, hostile, extra):
    code, out, err = run_main(monkeypatch, capsys, "taxonomy", "show", *extra, "--taxonomy", str(hostile))
    assert code == 0, err
    assert "[/]" in out and "[link=https://attacker.example]here[/link]" in out, out
    assert "\x1b]8;" not in out  # no OSC 8 hyperlink escape
    assert ":smile:" in out
    if extra == ["health.hostile"]:
        assert HOSTILE_DEFINITION in out


def test_taxonomy_validate_accepts_and_show_does_not_crash_on_closing_tag(monkeypatch, capsys, hostile):
    code, _, err = run_main(monkeypatch, capsys, "taxonomy", "validate", str(hostile))
    assert code == 0, err


def test_sparql_table_prints_literals_literally(monkeypatch, capsys, hostile, tmp_path):
    ttl = tmp_path / "t.ttl"
    code, _, err = run_main(monkeypatch, capsys, "ontology", "export", str(hostile), "-o", str(ttl))
    assert code == 0, err
    code, out, err = run_main(monkeypatch, capsys, "ontology", "sparql", "-g", str(ttl),
                              'SELECT ?l WHERE { ?c skos:prefLabel ?l FILTER(CONTAINS(STR(?l), "Evil")) }')
    assert code == 0, err
    assert "[/]" in out and "[link=https://attacker.example]" in out and "\x1b]8;" not in out


def test_query_table_cells_are_text_objects():
    from rdflib import Literal
    from rich.text import Text

    from refusal_atlas.ontology.sparql import QueryTable

    table = QueryTable(columns=["l"], rows=[[Literal("[/] [link=x]y[/link]")]]).to_rich()
    cell = table.columns[0]._cells[0]
    assert isinstance(cell, Text) and cell.plain == "[/] [link=x]y[/link]"


@pytest.mark.parametrize("command", [["taxonomy", "propose"], ["curate", "collect"], ["ontology", "sparql"]])
def test_help_text_keeps_square_brackets(command):
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    if command[0] == "taxonomy":
        assert "([a-z0-9_.-])" in result.output, result.output
    assert "()" not in result.output.replace("(s)", ""), result.output


CONTROL_LABEL = "Evil \x1b]52;c;cHduZWQ=\x07 \x1b[2J \x9b31m \u202eabc"


def test_control_characters_in_labels_are_shown_not_obeyed(monkeypatch, capsys, tmp_path):
    root = tmp_path / "tax"
    shutil.copytree(FIXTURE, root)
    edit.propose(root, "health.hostile", "health", CONTROL_LABEL, "Def \x1b[31mred\x1b[0m.")
    for extra in ([], ["health.hostile"], ["--tree"]):
        code, out, err = run_main(monkeypatch, capsys, "taxonomy", "show", *extra, "--taxonomy", str(root))
        assert code == 0, err
        assert "\u241b]52;c;cHduZWQ=" in out, out
        assert not any(c in out for c in ("\x1b", "\x9b", "\u202e")), repr(out)


def test_control_characters_in_a_column_name_stay_on_the_error_line(monkeypatch, capsys, tmp_path):
    corpus = tmp_path / "c.csv"
    corpus.write_text('prompt,"\x1b[31mresp\nonse"\n' + "".join(f"p{i},r{i}\n" for i in range(5)))
    code, _out, err = run_main(monkeypatch, capsys, "curate", "cluster", str(corpus), "-o", str(tmp_path / "o"))
    assert code == 1 and "\x1b" not in err and len(err.strip().splitlines()) == 1, repr(err)
    assert "\u241b[31mresp\u23ceonse" in err and not (tmp_path / "o").exists()
