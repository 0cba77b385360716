"""Atomic writes: every file the package writes goes through here.

A write lands under a temporary name in the target's own folder and is moved into place with
`os.replace`, so a crash leaves either the old file or the new one. An existing file's permission
bits are kept; a new file gets the mode the umask allows (as `open` would), not mkstemp's 0600.
"""

from __future__ import annotations

import fcntl
import json
import os
import reprlib
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from refusal_atlas.errors import AtlasError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "brief",
    "check_not_same_file",
    "clip",
    "file_lock",
    "folder_json",
    "json_default",
    "read_json_file",
    "read_utf8",
    "write_text_like",
]

BRIEF_CHARS = 80


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
    _refuse_read_only(path, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except NotADirectoryError as exc:
        raise AtlasError(f"{path}: a parent of this path is a file, not a folder") from exc
    except OSError as exc:  # permission denied, read-only file system, immutable folder, disk full
        raise AtlasError(f"{target.parent}: cannot write here ({exc.strerror or exc}); choose another output "
                         "folder") from exc
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


def _refuse_read_only(shown: Path, target: Path) -> None:
    # Renaming over a file needs only the folder's write permission, so a file the user made
    # read-only would be replaced silently; its write bits say the user wants it kept.
    try:
        mode = target.stat().st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) and not mode & 0o222:
        raise AtlasError(f"{shown}: the file is read-only; make it writable (chmod u+w) or choose another path")


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


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = BRIEF_CHARS
_REPR.maxother = BRIEF_CHARS
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _name, 6)


def brief(value: Any, limit: int = BRIEF_CHARS) -> str:
    """`repr(value)` bounded to about `limit` characters, whatever the value's size.

    Error messages echo user values; a YAML alias bomb is a few bytes on disk but expands to
    billions of items, so the full repr must never be built. reprlib visits a bounded number of
    items at a bounded depth, and the result is cut to `limit`.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(value: Any, limit: int = BRIEF_CHARS) -> str:
    """A value for a message: strings as they are, others as `brief` reprs; both cut to about `limit`."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[: limit - 3] + "..."
    return brief(value, limit)


def read_utf8(path: Path | str, what: str = "file") -> str:
    """A text file's contents as UTF-8 (a leading BOM dropped); bad bytes or a missing file are one line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError as exc:
        raise AtlasError(f"{path}: is a folder; name a {what}") from exc
    except FileNotFoundError as exc:
        raise AtlasError(f"{path}: {what} not found") from exc
    except PermissionError as exc:
        raise AtlasError(f"{path}: cannot read the {what} (permission denied)") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AtlasError(f"{path}:{line}: the {what} is not UTF-8 (byte 0x{raw[exc.start]:02x}); "
                         "re-save it as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_json_file(path: Path | str, remedy: str) -> Any:
    """Parse a JSON file the package wrote earlier; a truncated or edited one is one line naming `remedy`."""
    path = Path(path)
    text = read_utf8(path, "JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AtlasError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); the file is damaged "
                         f"(an interrupted write or an edit); {remedy}") from None


def folder_json(folder: Path, name: str, missing: str) -> Any:
    """The JSON file `name` that marks `folder` as one of the package's output folders; without it, an
    AtlasError "`folder`: `missing`"."""
    marker = folder / name
    if not marker.is_file():
        raise AtlasError(f"{folder}: {missing}")
    return json.loads(marker.read_text())


def write_text_like(path: Path | str, text: str) -> Path:
    """Rewrite an existing text file with `text` (LF line endings) in the file's own style.

    Keeps what the user's editor chose: a UTF-8 BOM and CRLF line endings are restored; the
    permission bits and symlinks are kept by `atomic_write`; a read-only file is refused there.
    """
    path = Path(path)
    try:
        head = path.read_bytes()
    except FileNotFoundError:
        head = b""
    bom = head.startswith(b"\xef\xbb\xbf")
    crlf = b"\r\n" in head and head.count(b"\r\n") >= head.count(b"\n") - head.count(b"\r\n")
    body = text.lstrip("\ufeff")
    if crlf:
        body = body.replace("\r\n", "\n").replace("\n", "\r\n")
    data = (b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8")
    return atomic_write_bytes(path, data)


@contextmanager
def file_lock(lock_path: Path | str) -> Iterator[None]:
    """Hold an exclusive advisory lock (fcntl) on `lock_path` while the block runs.

    Read-modify-write edits of one file by concurrent processes would otherwise lose all but the
    last write; holding this lock around the whole read, check and write serialises them.
    """
    lock_path = Path(lock_path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except PermissionError as exc:
        raise AtlasError(f"{lock_path.parent}: cannot write here ({exc.strerror}); the folder must be writable "
                         "to edit files in it") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
