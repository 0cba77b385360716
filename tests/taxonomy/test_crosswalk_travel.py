"""Crosswalks travel with the taxonomy: `init` copies them, export / validate / rename find them, none is a warning."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from cli.helpers import run_main, subprocess_cli
from refusal_atlas import paths
from refusal_atlas.taxonomy.crosswalk import crosswalk_files, load_crosswalks, nodes_for_external
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Status

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"


def cli(monkeypatch, capsys, *args: str) -> tuple[str, str]:
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 0 and "Traceback" not in err, (out, err)
    return out, err


@pytest.fixture
def copy(tmp_path: Path, monkeypatch, capsys) -> Path:
    if not crosswalk_files(paths.crosswalk_dir()):
        pytest.skip("no shipped crosswalks")
    out, _ = cli(monkeypatch, capsys, "taxonomy", "init", str(tmp_path / "mine"))
    assert f"{len(load_crosswalks())} crosswalk mappings" in out
    return tmp_path / "mine"


def test_init_copies_every_crosswalk_byte_for_byte(copy: Path, monkeypatch, capsys):
    shipped = {p.name: p.read_bytes() for p in crosswalk_files(paths.crosswalk_dir())}
    assert {p.name: p.read_bytes() for p in crosswalk_files(copy / "crosswalks")} == shipped
    out, err = cli(monkeypatch, capsys, "taxonomy", "validate", str(copy))
    assert f"{len(load_crosswalks())} crosswalk mappings" in out and not err


def test_mapped_to_works_on_the_copy_and_follows_a_rename(copy: Path, tmp_path: Path, monkeypatch, capsys):
    ttl = tmp_path / "copy.ttl"
    _, err = cli(monkeypatch, capsys, "ontology", "export", str(copy), "-o", str(ttl))
    assert "warning" not in err
    out, _ = cli(monkeypatch, capsys, "ontology", "mapped-to", "llamaguard3:S9", "-g", str(ttl), "-f", "json")
    expected = nodes_for_external(load_crosswalks(), "llamaguard3:S9")
    assert "weapons.explosives" in expected
    assert sorted(r["id"] for r in json.loads(out)) == sorted(expected)
    cli(monkeypatch, capsys, "taxonomy", "rename", "weapons.explosives", "weapons.blast", "-t", str(copy))
    cli(monkeypatch, capsys, "ontology", "export", str(copy), "-o", str(ttl))
    out, _ = cli(monkeypatch, capsys, "ontology", "mapped-to", "llamaguard3:S9", "-g", str(ttl), "-f", "json")
    assert sorted(r["id"] for r in json.loads(out)) == sorted(
        "weapons.blast" if n == "weapons.explosives" else n for n in expected)
    out, err = cli(monkeypatch, capsys, "taxonomy", "validate", str(copy))  # crosswalk subjects all still known
    assert "valid" in out


def test_a_taxonomy_without_crosswalks_warns_once(tmp_path: Path, monkeypatch, capsys, caplog):
    cli(monkeypatch, capsys, "ontology", "export", str(FIXTURE), "-o", str(tmp_path / "f.ttl"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("warning: no crosswalks") and "--crosswalks DIR" in warnings[0]
    caplog.clear()
    cli(monkeypatch, capsys, "ontology", "export", str(FIXTURE), "-o", str(tmp_path / "g.ttl"), "--no-crosswalks")
    cli(monkeypatch, capsys, "ontology", "export", "-o", str(tmp_path / "d.ttl"))  # the shipped one has them
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    out, _ = cli(monkeypatch, capsys, "taxonomy", "validate", str(FIXTURE))
    assert out.count("\n") == 1 and "; no crosswalks (add " in out and "--crosswalks DIR" in out


def test_the_export_warning_is_one_stderr_line_for_a_user(tmp_path: Path):
    proc = subprocess_cli("ontology", "export", str(FIXTURE), "-o", str(tmp_path / "f.ttl"))
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("warning: no crosswalks for the taxonomy ") and len(lines) == 2, err
    assert lines[1].startswith("wrote ")


def test_the_readme_taxonomy_commands_run_as_written(tmp_path: Path, monkeypatch, capsys):
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using it", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("   #")[0] for line in section.splitlines()
             if line.startswith(("refusal-atlas taxonomy init", "refusal-atlas taxonomy rename"))]
    assert len(lines) == 2
    monkeypatch.chdir(tmp_path)
    for line in lines:
        for command in re.split(r" && | ; ", line):
            args = shlex.split(command)
            assert args[0] == "refusal-atlas"
            cli(monkeypatch, capsys, *args[1:])
    assert load_taxonomy(tmp_path / "my-tax")["cyber.exploits"].status is Status.ACCEPTED


def test_curate_prompts_maps_external_sets_through_the_copys_crosswalks(copy: Path, tmp_path: Path, monkeypatch,
                                                                       capsys):
    cli(monkeypatch, capsys, "taxonomy", "rename", "weapons.explosives", "weapons.blast", "-t", str(copy))
    out = tmp_path / "p.parquet"
    _, err = cli(monkeypatch, capsys, "curate", "prompts", "--sets", "harmbench,strongreject", "-t", str(copy),
                 "-o", str(out))
    assert "warning" not in err
    nodes = {n for row in pd.read_parquet(out)["nodes"] for n in row}
    assert "weapons.blast.synthesis" in nodes and "weapons.blast" in nodes
    assert not {n for n in nodes if n.startswith("weapons.explosives")}
