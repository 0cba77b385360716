"""SSSOM TSV crosswalks: reading, located errors, node checks, CURIE expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from refusal_atlas.errors import AtlasError, ValidationErrors
from refusal_atlas.taxonomy.crosswalk import (
    check_crosswalks,
    external_iri,
    externals_for_node,
    load_crosswalks,
    nodes_for_external,
)
from refusal_atlas.taxonomy.loader import load_taxonomy

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"

HEADER = """\
#curie_map:
#  ra: https://w3id.org/refusal-atlas/taxonomy/
#  harmbench: https://w3id.org/refusal-atlas/external/harmbench/
#  skos: http://www.w3.org/2004/02/skos/core#
#  semapv: https://w3id.org/semapv/vocab/
#mapping_set_id: https://w3id.org/refusal-atlas/crosswalks/test
subject_id\tsubject_label\tpredicate_id\tobject_id\tobject_label\tmapping_justification\tconfidence
"""
J = "semapv:ManualMappingCuration"


def write(tmp_path: Path, rows: list[str], name: str = "harmbench.sssom.tsv") -> Path:
    folder = tmp_path / "cw"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return folder


def test_reads_rows_with_lines_and_labels(tmp_path):
    folder = write(tmp_path, [
        f"ra:weapons.explosives\tExplosives\tskos:narrowMatch\tharmbench:chemical_biological\tchemical_biological\t{J}\t0.9",
        f"ra:weapons\tWeapons\tskos:broadMatch\tharmbench:illegal\tillegal\t{J}\t",
        f"ra:health.dosing\tDosing\tskos:closeMatch\tharmbench:illegal\tillegal\t{J}\t",
    ])
    mappings = load_crosswalks(folder)
    assert [m.line for m in mappings] == [8, 9, 10]
    first = mappings[0]
    assert first.node_id == "weapons.explosives" and first.source == "harmbench"
    assert first.object_label == "chemical_biological" and first.confidence == 0.9
    assert first.object_iri == "https://w3id.org/refusal-atlas/external/harmbench/chemical_biological"
    assert nodes_for_external(mappings, "harmbench:illegal") == ["weapons", "health.dosing"]
    assert [m.object_id for m in externals_for_node(mappings, "weapons")] == ["harmbench:illegal"]
    assert check_crosswalks(load_taxonomy(FIXTURE), mappings) == []


@pytest.mark.parametrize(("row", "message"), [
    (f"ra:weapons\tW\tskos:sameAs\tharmbench:illegal\ti\t{J}\t", "unknown predicate_id 'skos:sameAs'"),
    ("ra:weapons\tW\tskos:exactMatch\tharmbench:illegal\ti\t\t", "empty mapping_justification"),
    (f"ra:weapons\tW\tskos:exactMatch\tillegal\ti\t{J}\t", "object_id 'illegal' is not a CURIE"),
    (f"ra:weapons\tW\tskos:exactMatch\tfoo:bar\ti\t{J}\t", "prefix 'foo' missing from the curie_map"),
    (f"ra:weapons\tW\tskos:exactMatch\tharmbench:illegal\ti\t{J}", "row has 6 fields, header has 7"),
    ("ra:weapons\tW\tskos:exactMatch\tharmbench:illegal\ti\tmanual\t", "must be a semapv: term"),
    (f"ra:weapons\tW\tskos:exactMatch\tharmbench:illegal\ti\t{J}\t1.5", "confidence 1.5 is outside [0, 1]"),
])
def test_malformed_row_is_located(tmp_path, row, message):
    good = f"ra:weapons\tW\tskos:exactMatch\tharmbench:harmful\th\t{J}\t"
    folder = write(tmp_path, [good, row])
    with pytest.raises(ValidationErrors) as info:
        load_crosswalks(folder)
    [problem] = info.value.problems  # the good row is fine; only line 9 is reported
    assert problem.startswith(f"{folder / 'harmbench.sssom.tsv'}:9: ") and message in problem


def test_duplicate_row_and_missing_column(tmp_path):
    row = f"ra:weapons\tW\tskos:exactMatch\tharmbench:illegal\ti\t{J}\t"
    folder = write(tmp_path, [row, row])
    with pytest.raises(ValidationErrors, match=r"harmbench.sssom.tsv:9: duplicate mapping \(same as line 8\)"):
        load_crosswalks(folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.sssom.tsv").write_text("subject_id predicate_id object_id\n")
    with pytest.raises(ValidationErrors, match=r"x.sssom.tsv:1: header lacks column\(s\)"):
        load_crosswalks(bad)


def test_unknown_node_ids_are_reported(tmp_path):
    folder = write(tmp_path, [f"ra:weapon.explosives\tX\tskos:exactMatch\tharmbench:illegal\ti\t{J}\t"])
    problems = check_crosswalks(load_taxonomy(FIXTURE), load_crosswalks(folder))
    assert [str(p) for p in problems] == [
        f"{folder / 'harmbench.sssom.tsv'}:8: subject_id 'ra:weapon.explosives': unknown node id "
        "'weapon.explosives' (did you mean 'weapons.explosives'?)"]


def test_external_iri():
    assert external_iri("ailuminate:vcr") == "https://w3id.org/refusal-atlas/external/ailuminate/vcr"
    assert external_iri("llamaguard3:S1") == "https://w3id.org/refusal-atlas/external/llamaguard3/S1"
    assert external_iri("x:y", {"x": "https://example.org/"}) == "https://example.org/y"
    assert external_iri("https://example.org/z") == "https://example.org/z"
    with pytest.raises(AtlasError, match="unknown CURIE prefix"):
        external_iri("nope:thing")
    with pytest.raises(AtlasError, match="not a CURIE"):
        external_iri("plain")


def test_shipped_crosswalks_match_the_shipped_taxonomy():
    mappings = load_crosswalks()
    if not mappings:
        pytest.skip("no shipped crosswalks yet")
    assert check_crosswalks(load_taxonomy(), mappings) == []
    assert {m.source for m in mappings} >= {"harmbench", "strongreject", "ailuminate", "llamaguard3",
                                            "mitrisk", "donotanswer"}
