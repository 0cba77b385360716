"""The README's "Python API" block runs as written, on a tiny model and the small fixture atlas (offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import refusal_atlas
from fixtures.atlas.builder import full_atlas
from refusal_atlas.lm.testing import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds exactly one python block"
    return blocks[0]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", n_layers=2, d_model=64)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder, full_atlas(tmp_path_factory.mktemp("atlas") / "atlas-out")


def test_the_facade_exports_what_the_readme_uses() -> None:
    code = readme_api_block()
    used = set(re.findall(r"\bra\.(\w+)", code))
    assert used <= set(refusal_atlas.__all__), used - set(refusal_atlas.__all__)
    for name in refusal_atlas.__all__:
        assert hasattr(refusal_atlas, name), name


def test_readme_python_api_block_runs(paths: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, atlas = paths
    code = readme_api_block()
    code, n_model = re.subn(r"(?m)^MODEL = .*$", f"MODEL = {str(model)!r}", code)
    code, n_atlas = re.subn(r"(?m)^ATLAS = .*$", f"ATLAS = {str(atlas)!r}", code)
    assert n_model == n_atlas == 1
    scope: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(("refuse", "comply", "redirect"))
    assert out[1].startswith("weapons.explosives ")  # its own selected direction ranks first
    assert len(out) == 4
    ds = scope["ds"]
    assert ds.nodes == ["weapons"] and tuple(scope["vector"].shape) == (64,)


def test_open_atlas_takes_a_string(paths: tuple[Path, Path]) -> None:
    store = refusal_atlas.open_atlas(str(paths[1]))
    assert isinstance(store, refusal_atlas.AtlasStore) and store.directions is not None
