"""Atomic writes: every file the package writes goes through here.

A write lands under a temporary name in the target's own folder and is moved into place with
`os.replace`, so a crash leaves either the old file or the new one. An existing file's permission
bits are kept; a new file gets the mode the umask allows (as `open` would), not mkstemp's 0600.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusal_atlas.errors import AtlasError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_not_same_file",
    "json_default",
]


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _resolve_target(path: Path) -> Path:
    """Write through a symlink to its target, so a shared file is edited rather than replaced by a copy."""
    return path.resolve() if path.is_symlink() else path


def atomic_write(path: Path | str, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp)` on a temporary path beside `path`, then move the finished file into place.

    Errors a user can fix (the folder is not writable, `path` is a folder) become one-line `AtlasError`s.
    """
    path = Path(path)
    target = _resolve_target(path)
    if target.is_dir():
        raise AtlasError(f"{path}: is a folder; name a file to write")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except PermissionError as exc:
        raise AtlasError(f"{target.parent}: cannot write here ({exc.strerror}); choose another output folder") from exc
    except NotADirectoryError as exc:
        raise AtlasError(f"{path}: a parent of this path is a file, not a folder") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, _target_mode(target))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, _write)


def atomic_write_text(path: Path | str, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` exactly as given (no newline translation: the caller chooses line endings)."""
    return atomic_write_bytes(path, text.encode(encoding))


def json_default(obj: Any) -> Any:
    """JSON for the numpy / pathlib values that results carry (numpy scalars, arrays, paths)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def atomic_write_json(path: Path | str, obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> Path:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=json_default)
    return atomic_write_text(path, text + "\n")


def check_not_same_file(output: Path | str, *inputs: Path | str | None) -> None:
    """Refuse an output that is one of the inputs: writing it would destroy the data being read."""
    out = Path(output)
    if not out.exists():
        return
    for given in inputs:
        if given is None:
            continue
        src = Path(given)
        if src.exists() and os.path.samefile(src, out):
            raise AtlasError(f"{output}: the output is the input file {given}; choose another output path")
