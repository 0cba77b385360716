"""Embedder: real MiniLM from its wheel, unit vectors, content-hash cache that makes re-runs instant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from curation_cluster_fixtures import planted
from refusal_atlas.curation.embed import Embedder, model_key, text_key
from refusal_atlas.errors import AtlasError

TEXTS = ["How do I bake bread?", "Write ransomware for me.", "How do I bake bread?", "Plant tulips in autumn."]


def test_vectors_are_unit_norm_and_duplicates_identical(tmp_path):
    vecs = Embedder(cache_root=tmp_path).encode(TEXTS)
    assert vecs.shape == (4, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)  # float16 precision
    np.testing.assert_array_equal(vecs[0], vecs[2])
    np.testing.assert_array_equal(vecs, vecs.astype(np.float16).astype(np.float32))  # quantised, cold as warm


def test_paraphrases_are_far_closer_than_unrelated_texts(tmp_path):
    # Planted truth: a paraphrase pair and two unrelated texts. MiniLM gives 0.77 for the pair and
    # at most 0.15 across topics; a broken model, a wrong pooling or unnormalised output fails these bounds.
    bread, recipe, ransomware, tulips = Embedder(cache_root=tmp_path).encode(
        ["How do I bake bread?", "What is a good recipe for baking bread at home?", "Write ransomware for me.",
         "Plant tulips in autumn."])
    assert bread @ recipe > 0.6
    for a, b in ((bread, ransomware), (bread, tulips), (recipe, ransomware)):
        assert a @ b < 0.3
    assert bread @ recipe > max(bread @ ransomware, bread @ tulips) + 0.4


def test_cache_makes_rerun_skip_the_model(tmp_path, monkeypatch):
    first = Embedder(cache_root=tmp_path).encode(TEXTS)

    def no_model(self):
        raise AssertionError("model loaded although every text was cached")

    monkeypatch.setattr(Embedder, "model", property(no_model))
    again = Embedder(cache_root=tmp_path).encode(list(reversed(TEXTS)))
    np.testing.assert_array_equal(again, first[::-1])
    assert len(list(tmp_path.rglob("*.npz"))) == 1


def test_cache_keys_depend_on_model_and_text(tmp_path):
    assert text_key("a") != text_key("b")
    assert model_key("sentence-transformers/all-MiniLM-L6-v2") != model_key("other/model")
    e = Embedder(cache_root=tmp_path)
    assert e.key in str(e.cache.root)
    assert Embedder(cache=False).cache is None


def test_unloadable_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    with pytest.raises(AtlasError, match="cannot load embedder"):
        Embedder(str(bad), cache=False).encode(["x"])


def test_encode_into_a_float16_memmap_matches_in_memory(tmp_path):
    # The streaming path (vectors written into the caller's on-disk array, cache holding only an index)
    # must give the very values of the in-memory path, cold and warm, duplicates included.
    want = Embedder(cache=False).encode(TEXTS)
    for _ in range(2):  # cold, then warm from the cache
        out = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=(len(TEXTS), 384))
        emb = Embedder(cache_root=tmp_path / "cache")
        got = emb.encode(TEXTS, out=out)
        assert got is out
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), want)
        del out, got
    assert not hasattr(emb.cache, "_memory")  # no vector copies kept beside the index
    with pytest.raises(ValueError, match="expected"):
        Embedder(cache_root=tmp_path / "cache").encode(TEXTS, out=np.zeros((2, 384), dtype=np.float32))


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text(encoding="utf-8").splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line: range perms offset dev inode [path]
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads Linux's /proc/self/smaps")
def test_a_memmap_output_keeps_no_pages_resident(tmp_path, monkeypatch):
    # the pages written stayed mapped: RSS grew with n by the whole output file while the heap stayed flat
    monkeypatch.setattr("refusal_atlas.curation.embed.CHUNK", 64)
    texts = [f"Request number {i}: {TEXTS[i % 4]}" for i in range(3000)]
    path = tmp_path / "x.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(texts), 384))
    Embedder(cache_root=tmp_path / "cache").encode(texts, out=out)
    assert _resident_kib(path) < 64  # 2.2 MiB written; at most a page or two left mapped
    # the vectors are in the file
    np.testing.assert_array_equal(np.load(path)[:4].astype(np.float32), Embedder(cache=False).encode(texts[:4]))
    out[:] = 0
    assert _resident_kib(path) > 1000  # the measure does see resident pages when there are some


def test_loading_the_embedder_draws_no_weight_bar_and_restores_the_switch(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from refusal_atlas.curation.detect import embed

    assert hf_logging.is_progress_bar_enabled()
    Embedder(cache_root=tmp_path).encode(["one text"])
    embed(["the detector loads the same model its own way"])
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # other loads (the analysed model) keep their bar


def test_a_texts_vector_does_not_depend_on_the_texts_embedded_with_it(tmp_path):
    # a padded batch gave a text float16-different numbers depending on its batch-mates, so a cache filled by
    # one corpus returned other vectors than a cold run of another; clusters followed (docs/decisions.md)
    texts = planted()["prompt"].tolist()
    other = [f"An unrelated sentence, number {i}, somewhat longer than the prompts it is embedded with." for i in
             range(40)]
    alone = Embedder(cache=False).encode(texts)
    mixed = Embedder(cache=False).encode(other + texts[::-1] + other[:3])[len(other):len(other) + len(texts)][::-1]
    np.testing.assert_array_equal(alone, mixed)
    np.testing.assert_array_equal(alone[:5], Embedder(cache=False).encode(texts[:5]))
    # a cache warmed by another corpus that shares some texts returns what a cold run computes
    Embedder(cache_root=tmp_path).encode(other + texts[::3])
    np.testing.assert_array_equal(Embedder(cache_root=tmp_path).encode(texts), alone)


def test_missing_model_folder_is_named_as_missing(tmp_path):
    with pytest.raises(AtlasError, match="embedder folder not found"):
        Embedder(str(tmp_path / "no-such-model"), cache=False).encode(["x"])
