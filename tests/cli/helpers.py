"""Run the real `refusal-atlas` entry point in-process or as a subprocess, and check its error contract."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from refusal_atlas.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"
ENTRY = "import sys; from refusal_atlas.cli import main; sys.argv[0] = 'refusal-atlas'; main()"


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `refusal-atlas ARGS` through `main()`, as a user would see it."""
    monkeypatch.setattr(sys, "argv", ["refusal-atlas", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The command must fail with exit 1 and exactly one `error: ...` line (no traceback)."""
    code, out, err = run_main(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def default_sigint() -> None:
    """In the child before exec: Ctrl-C acts as in a terminal, even where the suite itself was started in the
    background (a non-interactive shell's `&` ignores SIGINT, children inherit that and Python then keeps it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def subprocess_cli(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    """Start `refusal-atlas ARGS` as its own process (real signals, real concurrency)."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", ENTRY, *args], env=env, text=True,  # type: ignore[call-overload]
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint, **kwargs)
