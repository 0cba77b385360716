"""The README's query examples ("## Using it") show the output the commands really print on the fixture atlas.

Each ```console block that starts with `$ refusal-atlas query …` is run through the real CLI in a folder
holding the fixture atlas (`atlas-out`, tests/fixtures/atlas) and `random.npy`; the block's remaining lines
must be exactly what the command prints. `REFUSAL_ATLAS_UPDATE_README=1` rewrites the blocks instead.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from fixtures.atlas.builder import D_MODEL, full_atlas
from refusal_atlas.atlas.links import write_atlas_ttl
from refusal_atlas.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"```console\n\$ (refusal-atlas query [^\n]*)\n(.*?)```", re.S)


def _section(text: str) -> tuple[int, int]:
    start = text.index("## Using it")
    end = text.index("\n## ", start + 1)
    return start, end


def _tidy(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def test_the_readme_query_examples_print_what_the_readme_shows(tmp_path, monkeypatch):
    write_atlas_ttl(full_atlas(tmp_path / "atlas-out"))
    np.save(tmp_path / "random.npy", np.random.default_rng(7).normal(size=D_MODEL).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "160")
    text = README.read_text(encoding="utf-8")
    start, end = _section(text)
    section = text[start:end]
    blocks = BLOCK.findall(section)
    commands = {shlex.split(cmd)[2] for cmd, _ in blocks}
    assert {"node", "direction", "source", "sparql"} <= commands, commands
    outputs = []
    for cmd, _ in blocks:
        res = CliRunner().invoke(app, shlex.split(cmd)[1:], catch_exceptions=False)
        assert res.exit_code == 0, (cmd, res.output)
        outputs.append((cmd, _tidy(res.output)))
    if os.environ.get("REFUSAL_ATLAS_UPDATE_README"):
        it = iter(outputs)
        section = BLOCK.sub(lambda m: (lambda c, o: f"```console\n$ {c}\n{o}\n```")(*next(it)), section)
        README.write_text(text[:start] + section + text[end:], encoding="utf-8")
        return
    for (cmd, shown), (_, printed) in zip(blocks, outputs, strict=True):
        assert printed == _tidy(shown), f"README example `{cmd}` prints:\n{printed}"
