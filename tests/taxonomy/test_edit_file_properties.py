"""Class 6: an edited file keeps its encoding, BOM, line endings, mode and links; package data is never edited."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest

from refusal_atlas import paths
from refusal_atlas.curation.tables import write_table
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write_text
from refusal_atlas.taxonomy import edit
from refusal_atlas.taxonomy.loader import load_taxonomy

FIXTURE = Path(__file__).parents[1] / "fixtures" / "taxonomy" / "basic"


def test_bom_and_crlf_are_kept(tdir):
    target = tdir / "20-health.yaml"
    original = target.read_bytes().replace(b"\r\n", b"\n")
    target.write_bytes(b"\xef\xbb\xbf" + original.replace(b"\n", b"\r\n"))
    edit.propose(tdir, "health.diet", "health", "Diet", "Diet advice.")
    raw = target.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and not raw.startswith(b"\xef\xbb\xbf\xef\xbb\xbf")
    assert raw.count(b"\n") == raw.count(b"\r\n") > original.count(b"\n")
    assert "health.diet" in load_taxonomy(tdir).nodes
    edit.accept(tdir, "health.diet")  # a second edit of the BOM + CRLF file
    assert target.read_bytes().startswith(b"\xef\xbb\xbf") and b"\n" not in target.read_bytes().replace(b"\r\n", b"")


def test_plain_lf_file_stays_lf(tdir):
    edit.propose(tdir, "health.diet", "health", "Diet", "Diet advice.")
    raw = (tdir / "20-health.yaml").read_bytes()
    assert b"\r" not in raw and not raw.startswith(b"\xef\xbb\xbf")


def test_read_only_file_is_not_replaced(tdir):
    target = tdir / "20-health.yaml"
    before = target.read_bytes()
    target.chmod(0o444)
    try:
        with pytest.raises(AtlasError, match="read-only"):
            edit.propose(tdir, "health.diet", "health", "Diet", "Diet advice.")
        assert target.read_bytes() == before and stat.S_IMODE(target.stat().st_mode) == 0o444
    finally:
        target.chmod(0o644)


def test_mode_is_kept(tdir):
    target = tdir / "20-health.yaml"
    target.chmod(0o640)
    edit.propose(tdir, "health.diet", "health", "Diet", "Diet advice.")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_symlinked_file_is_edited_through_the_link(tdir, tmp_path):
    shared = tmp_path / "shared" / "health.yaml"
    shared.parent.mkdir()
    shutil.move(tdir / "20-health.yaml", shared)
    (tdir / "20-health.yaml").symlink_to(shared)
    edit.propose(tdir, "health.diet", "health", "Diet", "Diet advice.")
    assert (tdir / "20-health.yaml").is_symlink()
    assert "health.diet" in shared.read_text()


def test_one_file_of_the_shipped_taxonomy_is_not_edited():
    files = sorted(paths.default_taxonomy_dir().glob("*.yaml"))
    if not files:
        pytest.skip("no shipped taxonomy")
    node = next(n for n in load_taxonomy() if n.source_file == str(files[-1]) or Path(n.source_file) == files[-1])
    before = files[-1].read_bytes()
    with pytest.raises(AtlasError, match="shipped default taxonomy"):
        edit.deprecate(files[-1], node.id)
    assert files[-1].read_bytes() == before


def test_link_into_the_package_data_is_not_edited(tmp_path):
    files = sorted(paths.default_taxonomy_dir().glob("*.yaml"))
    if not files:
        pytest.skip("no shipped taxonomy")
    root = tmp_path / "mine"
    edit.copy_default(root)
    victim = root / files[-1].name
    victim.unlink()
    victim.symlink_to(files[-1])
    node = next(n for n in load_taxonomy(root) if Path(n.source_file or "").name == files[-1].name)
    before = files[-1].read_bytes()
    with pytest.raises(AtlasError, match="shipped default taxonomy"):
        edit.deprecate(root, node.id)
    assert files[-1].read_bytes() == before


def test_new_outputs_get_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.parquet")
        atomic_write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    for name in ("t.parquet", "t.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_editing_an_init_copy_works_even_if_the_package_is_read_only(tmp_path):
    root = tmp_path / "mine"
    edit.copy_default(root)
    assert all(p.stat().st_mode & 0o200 for p in root.rglob("*"))
