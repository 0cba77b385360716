"""The embedding cache and keys shared by every embedder (MiniLM and the residual stream).

Cache layout: ``<cache_dir>/embeddings/<model key>/<shard>.npz``, each shard holding ``keys``
(hex sha256 of the text, unicode array) and ``vectors`` (float16 for embeddings, L2-normalised;
float32 for auxiliary vectors such as a residual centre). Shards are written atomically and never
modified, so concurrent runs cannot corrupt each other; no pickle.

Why float16: every embedder returns `quantise(vectors)` — the float16 values as float32 — whether
they were just computed or read back, so a warm cache gives bit-identical vectors to a cold run,
and float noise of a different thread count (~1e-7) mostly vanishes in the rounding (2^-11
relative). Storage and memory are halved; cosines move by ~1e-5.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from refusal_atlas.hashing import sha256, text_sha256
from refusal_atlas.io import atomic_write

DEFAULT_BATCH_SIZE = 32  # the fastest batch for MiniLM on CPU (docs/decisions.md)


def quantise(x: np.ndarray) -> np.ndarray:
    """Vectors rounded to float16 precision, as float32 (idempotent)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def text_key(text: str) -> str:
    """Content hash of one text (the model is part of the cache folder, not of this key)."""
    return text_sha256(text)


def model_key(name_or_path: str) -> str:
    """A stable identifier for a model: a local folder by its file names and sizes, a hub id by name.

    Hashing names+sizes (not contents) is instant yet changes when the weights are replaced.
    """
    h = sha256()
    path = Path(name_or_path)
    if path.is_dir():
        h.update(path.name.encode())
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}:{f.stat().st_size}\n".encode())
    else:
        h.update(name_or_path.encode())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name or name_or_path)[:40].strip("-") or "model"
    return f"{slug}-{h.hexdigest()[:16]}"


class TextEmbedder(Protocol):
    """What clustering and mapping need of an embedder: unit vectors and a stable identity."""

    @property
    def key(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    def describe(self) -> dict[str, str | int]: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class EmbeddingCache:
    """Content-addressed vectors of one model (see module docstring for the layout).

    Memory is an index (key → shard) and nothing else: vectors are read from their shard when asked
    for and written into the caller's array, so a cache holding millions of vectors, or a corpus of
    200k texts, costs the index (~0.2 KiB a key) plus one shard at a time, not every vector.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index: dict[str, tuple[str, int]] = {}  # key -> (shard file name, row in the shard)
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.glob("*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as data:  # an npz member is read only when named
                    keys = data["keys"].tolist()
            except (OSError, ValueError, KeyError):
                continue  # a damaged shard only costs a recomputation
            for row, k in enumerate(keys):
                self._index.setdefault(k, (shard.name, row))

    def _by_shard(self, keys: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
        """{shard name: [(position in `keys`, row in the shard)]} for the stored keys."""
        self._load()
        out: dict[str, list[tuple[int, int]]] = {}
        for pos, k in enumerate(keys):
            hit = self._index.get(k)
            if hit is not None:
                out.setdefault(hit[0], []).append((pos, hit[1]))
        return out

    def fill(self, keys: Sequence[str], out: np.ndarray) -> np.ndarray:
        """Write the stored vector of each key into `out[position]` (float32 values); True where one was stored.

        A shard that became unreadable since the index was built leaves its rows False (recomputed).
        """
        found = np.zeros(len(keys), dtype=bool)
        for name, hits in self._by_shard(keys).items():
            try:
                with np.load(self.root / name, allow_pickle=False) as data:
                    vectors = np.asarray(data["vectors"])
            except (OSError, ValueError, KeyError):
                continue
            pos = np.asarray([p for p, _ in hits], dtype=np.int64)
            rows = np.asarray([r for _, r in hits], dtype=np.int64)
            out[pos] = vectors[rows].astype(np.float32)
            found[pos] = True
        return found

    def dim(self, keys: Sequence[str]) -> int | None:
        """Vector width of the shard holding the first stored key of `keys` (None when none is stored)."""
        for name in self._by_shard(keys):
            try:
                with np.load(self.root / name, allow_pickle=False) as data:
                    return int(np.asarray(data["vectors"]).shape[1])
            except (OSError, ValueError, KeyError, IndexError):
                continue
        return None

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored vectors as float32 (float16 shards come back exactly as `quantise` gives them)."""
        keys = list(dict.fromkeys(keys))
        width = self.dim(keys)
        if width is None:
            return {}
        out = np.zeros((len(keys), width), dtype=np.float32)
        found = self.fill(keys, out)
        return {k: out[i] for i, k in enumerate(keys) if found[i]}

    def put(self, keys: Sequence[str], vectors: np.ndarray, dtype: type = np.float16) -> None:
        """Store `vectors` (rounded to `dtype`: float16 for embeddings, float32 for exact auxiliaries)."""
        if not len(keys):
            return
        vectors = np.asarray(vectors).astype(dtype)
        self._load()
        self.root.mkdir(parents=True, exist_ok=True)
        shard = f"{text_sha256(''.join(keys))[:24]}.npz"

        def _write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.asarray(list(keys)), vectors=vectors)

        atomic_write(self.root / shard, _write)
        for row, k in enumerate(keys):
            self._index[k] = (shard, row)
