"""Content hashes used for provenance and caches (no heavy imports, so every module can use it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256(data: bytes = b"") -> hashlib._Hash:
    """A sha256 digest to update incrementally (the one place the package calls hashlib)."""
    return hashlib.sha256(data)


def text_sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_sha256(obj: object) -> str:
    """Hex sha256 of a JSON rendering with sorted keys (paths and other objects via str)."""
    return text_sha256(json.dumps(obj, sort_keys=True, default=str))
