"""The embedding cache and keys shared by every embedder (MiniLM and the residual stream).

Cache layout: ``<cache_dir>/embeddings/<model key>/<shard>.npz``, each shard holding ``keys``
(hex sha256 of the text, unicode array) and ``vectors`` (float16 for embeddings, L2-normalised;
float32 for auxiliary vectors such as a residual centre), and ``index.sqlite`` beside them (key →
shard, row). Shards are written atomically and never modified, so concurrent runs cannot corrupt
each other; no pickle. The index is derived from the shards and rebuilt from them when damaged.

Why float16: every embedder returns `quantise(vectors)` — the float16 values as float32 — whether
they were just computed or read back, so a warm cache gives bit-identical vectors to a cold run,
and float noise of a different thread count (~1e-7) mostly vanishes in the rounding (2^-11
relative). Storage and memory are halved; cosines move by ~1e-5.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from refusal_atlas.hashing import sha256, text_sha256
from refusal_atlas.io import atomic_write

INDEX_FILE = "index.sqlite"
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

    The index (key → shard, row) is a SQLite file beside the shards, `index.sqlite`, so memory holds
    neither the vectors nor the keys of a large cache: a lookup asks the index for one block of keys,
    and vectors are read from their shard into the caller's array. The index is derived data: shards
    it has not seen (written by another run, or before the index existed) are added when a cache is
    opened, a damaged index file is rebuilt from the shards, and a folder that cannot be written keeps
    its index in memory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._db: sqlite3.Connection | None = None

    def _index(self, create: bool = False) -> sqlite3.Connection | None:
        """The open index, synced with the shards on first use; None while the folder does not exist."""
        if self._db is not None:
            return self._db
        if not self.root.is_dir():
            if not create:
                return None
            self.root.mkdir(parents=True, exist_ok=True)
        db = _open_index(self.root / INDEX_FILE)
        try:
            _add_unseen_shards(db, self.root)
        except sqlite3.DatabaseError:  # damaged past the pages opening reads, or not writable
            db.close()
            return self._rebuild()
        self._db = db
        return db

    def _lookup(self, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
        """{key: (shard file name, row)} for the stored keys among `keys`."""
        db = self._index()
        if db is None:
            return {}
        try:
            return _query(db, keys)
        except sqlite3.DatabaseError:  # damage past the pages opening reads (e.g. a torn copy)
            return _query(self._rebuild(), keys)

    def _rebuild(self) -> sqlite3.Connection:
        """A fresh index from the shards: on disk where the damaged file can be replaced, else in memory."""
        self.close()
        path = self.root / INDEX_FILE
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        db: sqlite3.Connection | None = None
        if not path.exists():
            db = _open_index(path)
            try:
                _add_unseen_shards(db, self.root)
            except sqlite3.DatabaseError:
                db.close()
                db = None
        if db is None:
            db = _memory_index()
            _add_unseen_shards(db, self.root)
        self._db = db
        return db

    def _by_shard(self, keys: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
        """{shard name: [(position in `keys`, row in the shard)]} for the stored keys."""
        stored = self._lookup(keys)
        out: dict[str, list[tuple[int, int]]] = {}
        for pos, k in enumerate(keys):
            hit = stored.get(k)
            if hit is not None:
                out.setdefault(hit[0], []).append((pos, hit[1]))
        return dict(sorted(out.items()))

    def fill(self, keys: Sequence[str], out: np.ndarray) -> np.ndarray:
        """Write the stored vector of each key into `out[position]` (float32 values); True where one was stored.

        A shard that became unreadable, or no longer holds a key at its indexed row, since it was indexed
        leaves those rows False (recomputed, and `put` then points the index at the new shard).
        """
        found = np.zeros(len(keys), dtype=bool)
        for name, hits in self._by_shard(keys).items():
            try:
                with np.load(self.root / name, allow_pickle=False) as data:
                    stored, vectors = np.asarray(data["keys"]), np.asarray(data["vectors"])
            except (OSError, ValueError, KeyError):
                continue
            pos = np.asarray([p for p, _ in hits], dtype=np.int64)
            rows = np.asarray([r for _, r in hits], dtype=np.int64)
            # the shard must still hold each key at the indexed row: a file replaced under the same name
            # (edited, copied over) gives its rows back for recomputation, never another text's vector
            ok = (rows < min(len(stored), len(vectors))) & (rows >= 0)
            ok[ok] = stored[rows[ok]] == np.asarray([keys[p] for p in pos[ok]], dtype=str)
            out[pos[ok]] = vectors[rows[ok]].astype(np.float32)
            found[pos[ok]] = True
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
        db = self._index(create=True)
        assert db is not None
        shard = f"{text_sha256(''.join(keys))[:24]}.npz"

        def _write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.asarray(list(keys)), vectors=vectors)

        atomic_write(self.root / shard, _write)
        # REPLACE, not IGNORE: a key is put again only when its old shard could not be read
        rows = [(k, shard, row) for row, k in enumerate(keys)]
        try:
            _index_shard(db, shard, rows, replace=True)
        except sqlite3.DatabaseError:
            _index_shard(self._rebuild(), shard, rows, replace=True)

    def close(self) -> None:
        """Close the index file (a later use opens it again)."""
        if self._db is not None:
            self._db.close()
            self._db = None


_QUERY_KEYS = 900  # keys per SELECT: under SQLite's oldest limit on bound parameters (999)


def _query(db: sqlite3.Connection, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), _QUERY_KEYS):
        part = unique[start:start + _QUERY_KEYS]
        marks = ",".join("?" * len(part))
        for key, shard, row in db.execute(f"SELECT key, shard, row FROM vectors WHERE key IN ({marks})", part):
            found[key] = (shard, int(row))
    return found


def _open_index(path: Path) -> sqlite3.Connection:
    """The index at `path`, created when missing and rebuilt when it is not a readable index;
    in memory when the folder cannot be written (a read-only cache still serves its vectors)."""
    for attempt in (0, 1):
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(path, timeout=60, check_same_thread=False)
            db.executescript(_SCHEMA)
            db.execute("SELECT name FROM shards LIMIT 1").fetchall()
            db.execute("SELECT key, shard, row FROM vectors LIMIT 1").fetchall()
            return db
        except sqlite3.DatabaseError:  # not a database, damaged, or not writable
            if db is not None:
                db.close()
            if attempt == 0 and path.is_file() and os.access(path.parent, os.W_OK):
                path.unlink(missing_ok=True)  # derived data: rebuilt from the shards
                continue
            break
    return _memory_index()


def _memory_index() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.executescript(_SCHEMA)
    return db


_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, shard TEXT NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY) WITHOUT ROWID;
"""


def _index_shard(db: sqlite3.Connection, shard: str, rows: list[tuple[str, str, int]], *, replace: bool) -> None:
    verb = "REPLACE" if replace else "IGNORE"
    with db:  # one transaction: a shard is indexed whole or not at all
        db.executemany(f"INSERT OR {verb} INTO vectors (key, shard, row) VALUES (?, ?, ?)", rows)
        db.execute("INSERT OR IGNORE INTO shards (name) VALUES (?)", (shard,))


def _add_unseen_shards(db: sqlite3.Connection, root: Path) -> None:
    """Index the shards the index has not seen, in name order (the first shard to hold a key keeps it)."""
    seen = {name for (name,) in db.execute("SELECT name FROM shards")}
    for shard in sorted(root.glob("*.npz")):
        if shard.name in seen:
            continue
        try:
            with np.load(shard, allow_pickle=False) as data:  # an npz member is read only when named
                keys = data["keys"].tolist()
        except (OSError, ValueError, KeyError):
            continue  # a damaged shard only costs a recomputation
        _index_shard(db, shard.name, [(k, shard.name, row) for row, k in enumerate(keys)], replace=False)
