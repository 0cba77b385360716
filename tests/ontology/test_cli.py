"""`refusal-atlas ontology ...`: the commands, and every kind of bad input (one line, exit 1, no traceback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rdflib import Graph
from typer.testing import CliRunner

from refusal_atlas.cli import app, main
from refusal_atlas.ontology.export import build_graph
from refusal_atlas.ontology.from_rdf import graph_to_taxonomy
from refusal_atlas.ontology.io import serialize
from refusal_atlas.taxonomy.crosswalk import load_crosswalks, nodes_for_external
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.resolve import contextual_nodes

runner = CliRunner()
FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"


def ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> list[str]:
    """Run the real entry point: exit 1, no traceback; returns stderr lines (without the `error: ` that
    the entry point puts before messages that have no line number)."""
    monkeypatch.setattr(sys, "argv", ["refusal-atlas", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    assert info.value.code == 1, (out, err)
    assert "Traceback" not in err and err.strip(), err
    return [line.removeprefix("error: ") for line in err.strip().splitlines()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "taxonomy.ttl"
    path.write_text(serialize(build_graph(), "turtle"), encoding="utf-8")
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Any attempt to open a socket fails loudly and is recorded."""
    attempts: list[tuple] = []

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            attempts.append(args)
            raise AssertionError("network access attempted")

    def no_connection(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(socket, "getaddrinfo", no_connection)
    return attempts


# ---------------------------------------------------------------- export / import / validate


def test_export_to_a_file_reads_back(tmp_path: Path) -> None:
    """(All four formats are round-tripped in test_ontology_roundtrip; here the CLI path.)"""
    out = tmp_path / "taxonomy.jsonld"
    ok("ontology", "export", "-o", str(out), "--no-crosswalks")  # format from the extension
    graph = Graph().parse(out, format="json-ld")
    assert graph_to_taxonomy(graph).model_dump() == load_taxonomy().model_dump()
    fixture = tmp_path / "fixture.rdf"
    ok("ontology", "export", str(FIXTURE), "--format", "xml", "-o", str(fixture))
    assert graph_to_taxonomy(Graph().parse(fixture, format="xml")).model_dump() == load_taxonomy(FIXTURE).model_dump()


def test_export_to_stdout_is_turtle() -> None:
    text = ok("ontology", "export")
    assert text.startswith("@prefix") and "airo:RiskSource" in text and "skos:ConceptScheme" in text


def test_export_import_round_trip_via_cli(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "tax"
    result = runner.invoke(app, ["ontology", "import", str(exported), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "nodes to" in result.stdout
    assert load_taxonomy(out).model_dump() == load_taxonomy().model_dump()
    assert (tmp_path / "tax.rejects.ttl").is_file()  # crosswalk mappings kept beside the YAML


def test_validate_default_export(exported: Path) -> None:
    assert "conforms" in ok("ontology", "validate", str(exported))


def test_validate_reports_each_violation_on_its_own_line(monkeypatch, capsys, exported: Path, tmp_path: Path):
    text = exported.read_text(encoding="utf-8")
    text += "\ntax:weapons skos:broader tax:weapons.explosives .\ntax:cyber skos:prefLabel \"Cyber 2\"@en .\n"
    broken = tmp_path / "broken.ttl"
    broken.write_text(text, encoding="utf-8")
    lines = fails(monkeypatch, capsys, "ontology", "validate", str(broken))
    assert any("cycle" in line for line in lines)
    assert any("prefLabel" in line for line in lines)
    assert all(line.startswith(str(broken)) for line in lines)


# ---------------------------------------------------------------- bad input


def test_malformed_turtle_names_line_and_column(monkeypatch, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.ttl"
    bad.write_text('@prefix ex: <http://example.org/> .\nex:a ex:b ex:c .\nex:d ex:e "unterminated .\n')
    for command in ("validate", "import"):
        args = ["ontology", command, str(bad)] + (["-o", str(tmp_path / "out")] if command == "import" else [])
        lines = fails(monkeypatch, capsys, *args)
        assert len(lines) == 1
        assert lines[0].startswith(f"{bad}:3:"), lines
        assert "turtle syntax error" in lines[0]
    assert not (tmp_path / "out").exists()


def test_malformed_json_ld_names_line_and_column(monkeypatch, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonld"
    bad.write_text('{\n  "@id": "http://example.org/a",\n  "http://example.org/b": [\n}\n')
    lines = fails(monkeypatch, capsys, "ontology", "validate", str(bad))
    assert lines == [f"{bad}:4:1: JSON-LD syntax error: Expecting value"]


def test_malformed_ntriples_and_rdfxml_are_located(monkeypatch, capsys, tmp_path: Path) -> None:
    nt = tmp_path / "bad.nt"
    nt.write_text("<http://a> <http://b> <http://c> .\n<http://a> <http://b> .\n")
    assert fails(monkeypatch, capsys, "ontology", "validate", str(nt))[0].startswith(f"{nt}:2:1: nt syntax error")
    xml = tmp_path / "bad.rdf"
    xml.write_text("<?xml version='1.0'?>\n<rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>\n"
                   "<rdf:Description>\n</rdf:RDF>\n")
    assert fails(monkeypatch, capsys, "ontology", "validate", str(xml))[0].startswith(f"{xml}:4:")


def test_rdf_that_is_not_a_taxonomy(monkeypatch, capsys, tmp_path: Path) -> None:
    other = tmp_path / "foaf.ttl"
    other.write_text('@prefix foaf: <http://xmlns.com/foaf/0.1/> .\n<urn:me> a foaf:Person ; foaf:name "Me" .\n')
    lines = fails(monkeypatch, capsys, "ontology", "import", str(other), "-o", str(tmp_path / "out"))
    assert len(lines) == 1 and "not a taxonomy" in lines[0] and lines[0].startswith(str(other))
    assert any("not a taxonomy" in line for line in fails(monkeypatch, capsys, "ontology", "validate", str(other)))


def test_remote_owl_imports_are_never_fetched(offline, monkeypatch, capsys, tmp_path: Path):
    text = serialize(build_graph(FIXTURE), "turtle")
    text += ("\n<https://w3id.org/refusal-atlas/taxonomy> owl:imports <http://example.org/remote.ttl> , "
             "<https://w3id.org/airo> .\n")
    with_imports = tmp_path / "imports.ttl"
    with_imports.write_text(text, encoding="utf-8")
    assert "conforms" in ok("ontology", "validate", str(with_imports))
    ok("ontology", "import", str(with_imports), "-o", str(tmp_path / "out"), "--existing", str(FIXTURE))
    assert load_taxonomy(tmp_path / "out").model_dump() == load_taxonomy(FIXTURE).model_dump()
    only_imports = tmp_path / "only-imports.ttl"
    only_imports.write_text("@prefix owl: <http://www.w3.org/2002/07/owl#> .\n"
                            "<urn:x> owl:imports <http://example.org/taxonomy.ttl> .\n")
    assert "not a taxonomy" in fails(monkeypatch, capsys, "ontology", "import", str(only_imports),
                                     "-o", str(tmp_path / "out2"))[0]
    assert offline == []


def test_remote_json_ld_context_is_refused_not_fetched(offline, monkeypatch, capsys, tmp_path: Path) -> None:
    doc = tmp_path / "remote.jsonld"
    doc.write_text(json.dumps({"@context": "https://schema.org/", "@id": "urn:x", "name": "x"}))
    lines = fails(monkeypatch, capsys, "ontology", "validate", str(doc))
    assert "remote context" in lines[0] and "never fetched" in lines[0]
    nested = tmp_path / "nested.jsonld"
    nested.write_text(json.dumps({"@context": [{"@import": "https://example.org/ctx.jsonld"}], "@id": "urn:x"}))
    assert "remote context" in fails(monkeypatch, capsys, "ontology", "validate", str(nested))[0]
    assert offline == []


def test_xml_entities_are_refused(monkeypatch, capsys, tmp_path: Path) -> None:
    doc = tmp_path / "lol.rdf"
    doc.write_text('<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>\n'
                   '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/>\n')
    assert "ENTITY" in fails(monkeypatch, capsys, "ontology", "validate", str(doc))[0]


def test_fifty_megabyte_file_is_refused_quickly(monkeypatch, capsys, tmp_path: Path) -> None:
    big = tmp_path / "big.ttl"
    line = b'<urn:s> <urn:p> "' + b"x" * 80 + b'" .\n'
    with big.open("wb") as handle:
        for _ in range(50_000_000 // len(line) + 1):
            handle.write(line)
    assert big.stat().st_size >= 50_000_000
    start = time.perf_counter()
    lines = fails(monkeypatch, capsys, "ontology", "validate", str(big))
    assert time.perf_counter() - start < 5
    assert len(lines) == 1 and "50.0 MB" in lines[0] and "limit" in lines[0]
    monkeypatch.setenv("REFUSAL_ATLAS_MAX_RDF_MB", "10")
    assert "10 MB limit" in fails(monkeypatch, capsys, "ontology", "import", str(big), "-o", str(tmp_path / "o"))[0]


def test_unknown_format_and_missing_file(monkeypatch, capsys, exported: Path, tmp_path: Path) -> None:
    assert "unknown RDF format" in fails(monkeypatch, capsys, "ontology", "validate", str(exported),
                                         "--format", "yaml")[0]
    assert "no such file" in fails(monkeypatch, capsys, "ontology", "validate", str(tmp_path / "nope.ttl"))[0]


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonld"
    bad.write_text('{"@id": "urn:a",\n "urn:b": [}')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-c", "from refusal_atlas.cli import main; main()", "ontology",
                           "validate", str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{bad}:2:12: JSON-LD syntax error: Expecting value"
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- sparql and canned queries


def test_sparql_inline_csv_and_json(exported: Path) -> None:
    query = "SELECT ?id WHERE { ?n skos:notation ?id ; skos:broader tax:weapons } ORDER BY ?id"
    csv_out = ok("ontology", "sparql", query, "--graph", str(exported), "--format", "csv")
    lines = csv_out.splitlines()
    assert lines[0] == "id" and "weapons.explosives" in lines
    records = json.loads(ok("ontology", "sparql", query, "--graph", str(exported), "--format", "json"))
    assert [r["id"] for r in records] == lines[1:]


def test_sparql_from_file_default_graph_and_ask(tmp_path: Path) -> None:
    query = tmp_path / "q.rq"
    query.write_text("ASK { tax:weapons.explosives a airo:RiskSource , risk:PotentialRiskSource }")
    assert json.loads(ok("ontology", "sparql", str(query), "--format", "json")) == [{"ask": True}]


def test_sparql_table_and_construct(exported: Path) -> None:
    table = ok("ontology", "sparql", "SELECT ?label WHERE { tax:weapons skos:prefLabel ?label }",
               "--graph", str(exported))
    assert "Weapons" in table
    turtle = ok("ontology", "sparql", "CONSTRUCT { tax:weapons ?p ?o } WHERE { tax:weapons ?p ?o }",
                "-g", str(exported))
    assert "skos:prefLabel" in Graph().parse(data=turtle, format="turtle").serialize(format="turtle")


@pytest.mark.parametrize(("query", "message"), [
    ("SELECT * WHERE { ?s ?p }", "SPARQL syntax error"),
    ("SELECT * WHERE { SERVICE <http://example.org/sparql> { ?s ?p ?o } }", "SERVICE"),
    ("SELECT * FROM <http://example.org/data.ttl> WHERE { ?s ?p ?o }", "FROM"),
    ("missing.rq", "query file not found"),
])
def test_sparql_errors(offline, monkeypatch, capsys, exported: Path, query: str, message: str) -> None:
    lines = fails(monkeypatch, capsys, "ontology", "sparql", query, "--graph", str(exported))
    assert len(lines) == 1 and message in lines[0], lines
    assert offline == []


def test_descendants_and_conditions(exported: Path) -> None:
    tax = load_taxonomy()
    rows = json.loads(ok("ontology", "descendants", "weapons", "-g", str(exported), "-f", "json"))
    assert sorted(r["id"] for r in rows) == sorted(tax.descendants("weapons"))
    rows = json.loads(ok("ontology", "conditions", "weapons.explosives.synthesis", "-g", str(exported), "-f", "json"))
    assert {r["from"] for r in rows} == {"own", "inherited"}
    assert rows[0]["from"] == "own" and rows[0]["when"] == "user_age=minor" and rows[0]["expect"] == "refuse"


def test_mapped_to_and_contextual(exported: Path) -> None:
    rows = json.loads(ok("ontology", "mapped-to", "llamaguard3:S9", "-g", str(exported), "-f", "json"))
    assert sorted(r["id"] for r in rows) == sorted(nodes_for_external(load_crosswalks(), "llamaguard3:S9"))
    out = ok("ontology", "contextual", "-g", str(exported), "-f", "csv")
    assert sorted(line.split(",")[0] for line in out.splitlines()[1:]) == sorted(contextual_nodes(load_taxonomy()))


def test_canned_query_errors(monkeypatch, capsys, exported: Path) -> None:
    assert "did you mean 'weapons'" in fails(monkeypatch, capsys, "ontology", "descendants", "weapon",
                                             "-g", str(exported))[0]
    line = fails(monkeypatch, capsys, "ontology", "mapped-to", "llamaguard3:S99", "-g", str(exported))[0]
    assert "no crosswalk maps to 'llamaguard3:S99'" in line and "llamaguard3:S9" in line
