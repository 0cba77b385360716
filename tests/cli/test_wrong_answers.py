"""Class 5: inputs that used to give a wrong or misleading answer with exit 0."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from cli.helpers import default_sigint, one_line_error, run_main, subprocess_cli
from refusal_atlas.curation.tables import read_table
from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy import edit
from refusal_atlas.taxonomy.loader import id_problem
from refusal_atlas.taxonomy.model import Node

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"


def test_negative_limit_is_refused(monkeypatch, capsys, tmp_path):
    src = tmp_path / "p.csv"
    src.write_text("prompt\na\nb\n", encoding="utf-8")
    line = one_line_error(monkeypatch, capsys, "curate", "collect", "-p", str(src), "-o", str(tmp_path / "c.jsonl"),
                          "--limit", "-1", "--model", str(tmp_path / "no-model"))
    assert "--limit must be 0 or more" in line


@pytest.mark.parametrize("bad", ["health.x\n", "health.x\r\n", "\nhealth.x", "health.x "])
def test_id_with_a_trailing_newline_is_invalid(tmp_path, bad):
    assert id_problem(bad) is not None
    with pytest.raises(ValueError):
        Node(id=bad, label="L", definition="D")
    root = tmp_path / "tax"
    shutil.copytree(FIXTURE, root)
    with pytest.raises(AtlasError, match="may contain only"):
        edit.propose(root, bad, "health", "L", "D")


def test_yaml_id_with_escaped_newline_fails_validation(monkeypatch, capsys, tmp_path):
    root = tmp_path / "tax"
    shutil.copytree(FIXTURE, root)
    with open(root / "20-health.yaml", "a", encoding="utf-8") as fh:
        fh.write('  - id: "health.newline\\n"\n    label: N\n    definition: N.\n    broader: [health]\n')
    code, _, err = run_main(monkeypatch, capsys, "taxonomy", "validate", str(root))
    assert code == 1 and "may contain only" in err


def test_csv_with_a_bom_keeps_its_first_column(monkeypatch, capsys, tmp_path):
    src = tmp_path / "excel.csv"
    src.write_bytes("prompt,response\r\nHow do I pick a lock?,I can't help with that.\r\n".encode("utf-8-sig"))
    assert list(read_table(src).columns) == ["prompt", "response"]
    out = tmp_path / "o.jsonl"
    code, _, err = run_main(monkeypatch, capsys, "curate", "detect", str(src), "-o", str(out), "--detector", "marker")
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt"] == "How do I pick a lock?" and row["refused"] is True


def test_jsonl_with_a_bom(tmp_path):
    src = tmp_path / "b.jsonl"
    src.write_bytes('{"prompt": "a"}\n'.encode("utf-8-sig"))
    assert read_table(src)["prompt"].tolist() == ["a"]


def test_sigint_prints_the_resume_line_and_exits_130():
    # Start-up (imports, graph build) takes seconds to minutes on a loaded machine; a signal then
    # would hit the imports, not the command. Time a trivial query first and wait well past that.
    started = time.monotonic()
    probe = subprocess_cli("ontology", "sparql", "ASK { ?s ?p ?o }")
    probe.communicate(timeout=600)
    startup = time.monotonic() - started
    # a cartesian product over the shipped taxonomy runs for minutes with the time limit off
    proc = subprocess_cli("ontology", "sparql", "--timeout", "0", "--max-rows", "0",
                          "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i }")
    time.sleep(2 * startup + 3)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err


@pytest.mark.parametrize("delay", [2.5, 4.0])
def test_ctrl_c_while_the_commands_load_is_the_resume_line_not_a_traceback(delay: float) -> None:
    """Loading the sub-commands takes seconds (torch, transformers); a Ctrl-C then ends with 130 and one line."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", "from refusal_atlas.cli import main; main()", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the commands loaded before the signal arrived")
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
