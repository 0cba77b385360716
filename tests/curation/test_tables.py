"""Tables: format by extension, atomic writes, rejects with row numbers, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from refusal_atlas.curation.tables import (
    read_table,
    rejects_path,
    require_columns,
    require_rows,
    table_format,
    write_rejects,
    write_table,
)
from refusal_atlas.errors import AtlasError


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x, with comma", 'say "hi"\nnext line'],
                         "nodes": [["cyber", "cyber.malware"], []], "harmful": [True, False]})


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_round_trip_keeps_text_and_node_lists(tmp_path, ext):
    path = tmp_path / f"t.{ext}"
    write_table(_frame(), path)
    back = read_table(path)
    assert back["prompt"].tolist() == _frame()["prompt"].tolist()
    assert [list(n) for n in back["nodes"]] == [["cyber", "cyber.malware"], []]
    assert list(back.index) == [1, 2]  # row numbers, 1-based
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_unknown_extension_is_one_clear_error(tmp_path):
    with pytest.raises(AtlasError, match=r"unsupported table format '\.txt'"):
        table_format(tmp_path / "x.txt")
    with pytest.raises(AtlasError, match="file not found"):
        read_table(tmp_path / "missing.csv")


def test_malformed_jsonl_lines_are_rejected_with_line_numbers(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "ok"}\n{not json}\n[1, 2]\n\n{"prompt": "also ok"}\n')
    rejects: list[dict] = []
    df = read_table(path, rejects=rejects)
    assert df["prompt"].tolist() == ["ok", "also ok"]
    assert list(df.index) == [1, 5]
    assert [(r["row"], r["reason"].split(" (")[0]) for r in rejects] == [(2, "invalid JSON"),
                                                                        (3, "line is not a JSON object")]


def test_csv_with_wrong_field_count_and_comment_line(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("# a comment line\nprompt,category\nhello,a\nbroken,row,extra\nbye,b\n")
    rejects: list[dict] = []
    df = read_table(path, rejects=rejects)
    assert df["prompt"].tolist() == ["hello", "bye"]
    assert rejects[0]["row"] == 2 and "expected 2 fields, found 3" in rejects[0]["reason"]


def test_missing_columns_and_empty_tables(tmp_path):
    df = pd.DataFrame({"text": ["a"]})
    with pytest.raises(AtlasError, match=r"f\.csv: missing column\(s\) response \(found: text\); use --x"):
        require_columns(df, ["response"], "f.csv", hint="use --x")
    with pytest.raises(AtlasError, match="no rows"):
        require_rows(df.iloc[:0], "f.csv")
    with pytest.raises(AtlasError, match="all 3 row"):
        require_rows(df.iloc[:0], "f.csv", rejected=3)


def test_repeated_column_name_is_one_clear_error(tmp_path):
    # pandas would keep both, and `df["prompt"]` would then be a frame that fails far from the cause
    path = tmp_path / "dup.csv"
    path.write_text("prompt,response,prompt\na,b,c\n")
    with pytest.raises(AtlasError, match=r"dup\.csv: column 'prompt' appears twice in the header \(columns 1 and 3\)"):
        read_table(path)


def test_rejects_file_beside_output(tmp_path):
    out = tmp_path / "corpus.parquet"
    path = write_rejects(out, [{"source": "x", "row": 4, "reason": "empty prompt"}])
    assert path == rejects_path(out) == tmp_path / "corpus.parquet.rejects.jsonl"
    assert json.loads(path.read_text().splitlines()[0])["row"] == 4
    assert write_rejects(out, []) is None and not path.exists()  # a stale rejects file is removed


def test_csv_quote_left_open_is_an_error_not_one_swallowed_cell(tmp_path):
    # a lenient reader would read "1" and then every later line as one cell: rows 2 and 3 silently gone
    p = tmp_path / "open.csv"
    p.write_text('# version 1\nid,prompt\n0,fine\n1,"never closed\n2,second\n3,third\n', encoding="utf-8")
    with pytest.raises(AtlasError, match=r"open\.csv: row 2 \(line 4\): a quoted field opened there is never closed"):
        read_table(p)


def test_csv_lenient_quoting_that_loses_nothing_still_reads(tmp_path):
    p = tmp_path / "ok.csv"
    p.write_text('id,prompt\n1,"ab"cd\n2,a"b\n3,"two\nlines"\n', encoding="utf-8")
    assert read_table(p)["prompt"].tolist() == ["abcd", 'a"b', "two\nlines"]
