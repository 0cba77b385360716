"""Class 4: bad paths and bad files end in one `error:` line and exit 1, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cli.helpers import one_line_error, run_main
from refusal_atlas.cli import _os_error_line
from refusal_atlas.cli.directions_common import read_prompts
from refusal_atlas.curation.tables import read_table, write_table
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import read_json_file

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"


@pytest.fixture
def responses(tmp_path: Path) -> Path:
    src = tmp_path / "r.csv"
    src.write_text("prompt,response\na,I can't help with that.\nb,Sure.\n", encoding="utf-8")
    return src


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can create files in, root included (immutable), else skip."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=False)
        return
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.touch()
    except PermissionError:
        yield folder
        folder.chmod(0o755)
        return
    probe.unlink()
    pytest.skip("cannot make an unwritable folder here (root without chattr)")


def test_unwritable_output_folder(monkeypatch, capsys, responses, unwritable):
    line = one_line_error(monkeypatch, capsys, "curate", "detect", str(responses), "-o",
                          str(unwritable / "out.parquet"), "--detector", "marker")
    assert line.startswith("error: ") and "cannot write here" in line


def test_read_only_taxonomy_folder(monkeypatch, capsys, tmp_path):
    root = tmp_path / "tax"
    shutil.copytree(FIXTURE, root)
    if subprocess.run(["chattr", "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("chattr not available")
    try:
        line = one_line_error(monkeypatch, capsys, "taxonomy", "propose", "--id", "health.x", "--parent", "health",
                              "--label", "X", "--definition", "An x.", "--taxonomy", str(root))
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=False)
    assert "cannot write here" in line


def test_output_naming_a_folder(monkeypatch, capsys, responses, tmp_path):
    (tmp_path / "out.jsonl").mkdir()
    line = one_line_error(monkeypatch, capsys, "curate", "detect", str(responses), "-o", str(tmp_path / "out.jsonl"),
                          "--detector", "marker")
    assert "is a folder" in line


def test_cell_over_128_kib_is_read(tmp_path):
    big = "word " * 60_000  # 300 KB in one quoted cell
    src = tmp_path / "big.csv"
    src.write_text(f'prompt,response\nq,"{big}"\n', encoding="utf-8")
    df = read_table(src)
    assert df["response"].iloc[0] == big


def test_mixed_int_and_text_column_to_parquet(monkeypatch, capsys, tmp_path):
    src = tmp_path / "m.jsonl"
    src.write_text('{"id": 1, "prompt": "a", "response": "Sure."}\n{"id": "x2", "prompt": "b", "response": "No."}\n',
                   encoding="utf-8")
    out = tmp_path / "m.parquet"
    code, _, err = run_main(monkeypatch, capsys, "curate", "detect", str(src), "-o", str(out), "--detector", "marker")
    assert code == 0, err
    assert pd.read_parquet(out)["id"].tolist() == ["1", "x2"]


def test_unwritable_parquet_value_is_one_line(tmp_path):
    df = pd.DataFrame({"v": [{"a": 1}, 3]})
    with pytest.raises(AtlasError, match=r"cannot write parquet"):
        write_table(df, tmp_path / "x.parquet")
    assert not list(tmp_path.iterdir())


def test_non_utf8_query_file(monkeypatch, capsys, tmp_path):
    rq = tmp_path / "q.rq"
    rq.write_bytes(b"SELECT ?s WHERE { ?s ?p \"caf\xe9\" }\n")
    line = one_line_error(monkeypatch, capsys, "ontology", "sparql", str(rq))
    assert str(rq) in line and "not UTF-8" in line


def test_truncated_json_names_the_file_and_the_remedy(tmp_path):
    damaged = tmp_path / "run.json"
    damaged.write_text('{"model_id": "x", "gener', encoding="utf-8")
    with pytest.raises(AtlasError, match=r"run\.json:1: not valid JSON .*delete it"):
        read_json_file(damaged, "delete it")


def test_damaged_clusters_json_is_one_line(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "clusters"
    folder.mkdir()
    for name in ("assignments.parquet", "embeddings.npy"):
        (folder / name).write_bytes(b"")
    (folder / "clusters.json").write_text('{"format": ', encoding="utf-8")
    line = one_line_error(monkeypatch, capsys, "curate", "map", str(folder))
    assert "clusters.json" in line and "not valid JSON" in line


def test_os_error_safety_net_is_one_line():
    exc = PermissionError(13, "Permission denied", "/some/file")
    assert _os_error_line(exc) == "error: /some/file: Permission denied; choose a path you can write to, or fix its " \
                                  "permissions"
    assert _os_error_line(OSError(28, "No space left on device")) == "error: No space left on device"


@pytest.mark.parametrize("below", [False, True])
def test_a_cache_path_that_is_a_file_is_one_line(monkeypatch, capsys, tmp_path, below):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"request {i}"}) + "\n" for i in range(12)), encoding="utf-8")
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder", encoding="utf-8")
    monkeypatch.setenv("REFUSAL_ATLAS_CACHE", str(blocker / "sub" if below else blocker))
    line = one_line_error(monkeypatch, capsys, "curate", "cluster", str(corpus), "--text", "prompt",
                          "-o", str(tmp_path / "out"))
    assert str(blocker) in line
    assert ("a parent of the path is a file" if below else "a file is where a folder is needed") in line
    assert blocker.read_text(encoding="utf-8") == "not a folder"


def test_rejects_are_json_lines(monkeypatch, capsys, tmp_path):
    src = tmp_path / "r.csv"
    src.write_text('prompt,response\nx,"a","b"\n', encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, "curate", "detect", str(src), "-o", str(tmp_path / "o.csv"),
                            "--detector", "marker")
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: ") and "all 1 were rejected" in err
    assert json.loads((tmp_path / "o.csv.rejects.jsonl").read_text())["record"] == ["x", "a", "b"]


@pytest.mark.parametrize("args, says", [
    (("taxonomy", "rename", "a", "b", "--dir", "x"), "No such option: --dir"),
    (("curate", "cluster"), "Missing argument"),
    (("run", "--seed", "notanint"), "Invalid value for '--seed'"),
])
def test_usage_errors_print_click_s_message_not_a_traceback(monkeypatch, capsys, args, says):
    """typer ≥ 0.2x raises its own copy of click's exceptions; each is still shown as the usage error it is."""
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("Error: ")


def test_prompt_table_with_unreadable_harmful_flag(tmp_path):
    # the causal commands and `organism build` mask rows with the flag: a value that is no flag is an error;
    # `directions extract` reads the column as is and rejects such rows to its rejects file (test_directions_cli)
    table = tmp_path / "p.csv"
    table.write_text("prompt,node,harmful\nbuild a bomb,weapons,yes\nbake bread,,perhaps\n", encoding="utf-8")
    with pytest.raises(AtlasError) as err:
        read_prompts(table)
    assert str(err.value) == f"{table}: row 2: harmful is 'perhaps'; write true/false, yes/no or 1/0 (1 such row(s))"
    assert read_prompts(table, parse_flags=False)["harmful"].tolist() == ["yes", "perhaps"]


def test_directions_prompt_table_with_a_quote_left_open(monkeypatch, capsys, tmp_path):
    table = tmp_path / "p.jsonl"
    table.write_text('{"prompt": "a", "node": "n", "harmful": true}\n{"prompt": "b", "node": \n', encoding="utf-8")
    line = one_line_error(monkeypatch, capsys, "directions", "extract", "--prompts", str(table), "-o",
                          str(tmp_path / "out"))
    assert line.startswith(f"error: {table}: row 2: invalid JSON")


def test_harmful_flags_written_as_words_are_booleans(tmp_path):
    # "no" read as text is truthy: every harmless row would have been masked in as harmful
    table = tmp_path / "p.csv"
    table.write_text("prompt,node,harmful\nbuild a bomb,weapons,Yes\nbake bread,,no\nsing,,FALSE\nhack,cyber,1\n",
                     encoding="utf-8")
    df = read_prompts(table)
    assert df["harmful"].tolist() == [True, False, False, True] and df["harmful"].dtype == bool
    assert df["node"].tolist() == ["weapons", "", "", "cyber"]


def _tampered_clusters(tmp_path: Path, how: str) -> Path:
    import numpy as np

    from refusal_atlas.curation.cluster_store import load_run, save_run

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    a = pd.DataFrame({"row": range(6), "text": [f"t{i}" for i in range(6)], "cluster": [0, 0, 0, 1, 1, 1],
                      "cluster_level_0": [0] * 6})
    meta = {"clusters": [{"id": 0, "size": 3}, {"id": 1, "size": 3}], "tree": {"levels": [{"level": 0}]},
            "embedder": {"model": "m"}, "input": {"rejected": 0}}
    folder = save_run(tmp_path / how, a, x, meta)
    load_run(folder)  # untampered, it loads
    if how == "nan":
        x[2, 1] = np.nan
    elif how == "text_cluster":
        a["cluster"] = ["0x"] * 6
    elif how == "float_level":
        a["cluster_level_0"] = 0.5
    elif how == "no_text":
        a = a.drop(columns=["text"])
    elif how == "clusters_str":
        meta["clusters"] = "oops"
    elif how == "cluster_entry":
        meta["clusters"] = [{"size": 3}]
    elif how == "levels":
        meta["tree"] = {"levels": ["x"]}
    elif how == "int_vectors":
        x = np.zeros((6, 4), dtype=np.int64)  # type: ignore[assignment]
    return save_run(folder, a, x, meta)


@pytest.mark.parametrize("how", ["nan", "text_cluster", "float_level", "no_text", "clusters_str", "cluster_entry",
                                 "levels", "int_vectors"])
def test_an_edited_clusters_folder_is_one_line(monkeypatch, capsys, tmp_path, how):
    folder = _tampered_clusters(tmp_path, how)
    if how == "int_vectors":  # save_run writes float32; a hand-made file need not
        import numpy as np

        np.save(folder / "embeddings.npy", np.zeros((6, 4), dtype=np.int64))
    line = one_line_error(monkeypatch, capsys, "curate", "map", str(folder), "-o", str(tmp_path / "out"))
    assert "re-run `refusal-atlas curate cluster`" in line, line
    assert not (tmp_path / "out").exists()
