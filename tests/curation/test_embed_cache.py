"""EmbeddingCache: shards of vectors with an on-disk SQLite index (no real model needed: vectors are planted)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from refusal_atlas.curation import embed
from refusal_atlas.curation.embed import Embedder
from refusal_atlas.curation.embed_cache import INDEX_FILE, EmbeddingCache, quantise, text_key


def _planted(n: int, width: int = 8, seed: int = 0) -> tuple[list[str], np.ndarray]:
    keys = [text_key(f"text {i}") for i in range(n)]
    return keys, quantise(np.random.default_rng(seed).normal(size=(n, width)))


def _read(cache: EmbeddingCache, keys: list[str], width: int = 8) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(keys), width), dtype=np.float32)
    return cache.fill(keys, out), out


def test_vectors_come_back_exactly_through_the_index_on_disk(tmp_path):
    keys, vecs = _planted(50)
    EmbeddingCache(tmp_path).put(keys[:30], vecs[:30])
    EmbeddingCache(tmp_path).put(keys[30:], vecs[30:])
    assert (tmp_path / INDEX_FILE).is_file()
    asked = [keys[40], "not stored", keys[3], keys[40]]
    found, out = _read(EmbeddingCache(tmp_path), asked)
    assert found.tolist() == [True, False, True, True]
    np.testing.assert_array_equal(out[[0, 2, 3]], vecs[[40, 3, 40]])
    assert not out[1].any()


def test_a_cache_holds_no_per_key_state_in_python(tmp_path):
    # the index used to be a dict of every key (~0.3 KiB a key): memory grew with the cache, not with the request
    keys, vecs = _planted(20_000)
    for start in range(0, len(keys), 4096):
        EmbeddingCache(tmp_path).put(keys[start:start + 4096], vecs[start:start + 4096])
    cache = EmbeddingCache(tmp_path)
    tracemalloc.start()
    try:
        found, out = _read(cache, keys[-100:])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found.all()
    np.testing.assert_array_equal(out, vecs[-100:])
    assert held < 256 * 1024  # a dict of 20,000 keys is ~5 MiB


def test_shards_the_index_has_not_seen_are_added_when_a_cache_opens(tmp_path):
    keys, vecs = _planted(20)
    EmbeddingCache(tmp_path / "a").put(keys[:10], vecs[:10])
    EmbeddingCache(tmp_path / "b").put(keys[10:], vecs[10:])
    for shard in (tmp_path / "b").glob("*.npz"):  # copied in by hand, or written before the index existed
        shard.rename(tmp_path / "a" / shard.name)
    found, out = _read(EmbeddingCache(tmp_path / "a"), keys)
    assert found.all()
    np.testing.assert_array_equal(out, vecs)


def test_two_caches_on_one_folder_see_each_others_writes(tmp_path):
    keys, vecs = _planted(6)
    first, second = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)
    first.put(keys[:3], vecs[:3])
    assert _read(second, keys[:3])[0].all()  # second opened its index after first's write
    second.put(keys[3:], vecs[3:])
    found, out = _read(first, keys)  # first's index was open before second's write
    assert found.all()
    np.testing.assert_array_equal(out, vecs)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "directory"])
def test_a_damaged_index_is_rebuilt_from_the_shards(tmp_path, damage):
    keys, vecs = _planted(12)
    cache = EmbeddingCache(tmp_path)
    cache.put(keys, vecs)
    cache.close()
    index = tmp_path / INDEX_FILE
    if damage == "garbage":
        index.write_bytes(b"\x00not a database\xff" * 100)
    elif damage == "truncated":
        index.write_bytes(index.read_bytes()[:100])
    else:  # a path that cannot be opened as a file at all: the index is kept in memory
        index.unlink()
        index.mkdir()
    found, out = _read(EmbeddingCache(tmp_path), keys)
    assert found.all()
    np.testing.assert_array_equal(out, vecs)


def test_an_index_damaged_past_its_first_pages_is_rebuilt_when_a_lookup_meets_the_damage(tmp_path):
    # a torn copy: the header and schema pages read fine, the key pages in the middle do not
    keys, vecs = _planted(20_000)
    for start in range(0, len(keys), 4096):
        EmbeddingCache(tmp_path).put(keys[start:start + 4096], vecs[start:start + 4096])
    index = tmp_path / INDEX_FILE
    data = bytearray(index.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8192] = b"\xa5" * 8192
    index.write_bytes(bytes(data))
    cache = EmbeddingCache(tmp_path)
    found, out = _read(cache, keys)
    assert found.all()
    np.testing.assert_array_equal(out, vecs)
    more_keys, more = _planted(3, seed=1)
    cache.put([k + "x" for k in more_keys], more)  # and it takes writes again
    assert _read(EmbeddingCache(tmp_path), [k + "x" for k in more_keys])[0].all()


def test_a_lost_shard_is_recomputed_and_the_index_points_at_its_new_shard(tmp_path):
    keys, vecs = _planted(4)
    EmbeddingCache(tmp_path).put(keys, vecs)
    for shard in tmp_path.glob("*.npz"):
        shard.unlink()
    cache = EmbeddingCache(tmp_path)
    assert not _read(cache, keys)[0].any()
    cache.put(keys[:2], vecs[:2])  # what a run does with the keys it could not read
    found, out = _read(EmbeddingCache(tmp_path), keys)
    assert found.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(out[:2], vecs[:2])


@pytest.mark.parametrize("swap", ["other keys", "fewer rows"])
def test_a_shard_replaced_under_its_name_never_gives_another_texts_vector(tmp_path, swap):
    keys, vecs = _planted(8)
    EmbeddingCache(tmp_path).put(keys[:4], vecs[:4])
    EmbeddingCache(tmp_path / "other").put(keys[4:], vecs[4:])  # as many rows: every indexed row exists
    (shard,) = tmp_path.glob("*.npz")
    if swap == "other keys":  # a different shard copied over this one's name
        (tmp_path / "other" / next((tmp_path / "other").glob("*.npz")).name).replace(shard)
    else:
        np.savez(shard.with_suffix(".tmp.npz"), keys=np.asarray(keys[:2]), vectors=vecs[:2].astype(np.float16))
        shard.with_suffix(".tmp.npz").replace(shard)
    found, out = _read(EmbeddingCache(tmp_path), keys[:4])
    assert found.tolist() == ([False] * 4 if swap == "other keys" else [True, True, False, False])
    np.testing.assert_array_equal(out[found], vecs[:4][found])


def test_a_missing_folder_is_an_empty_cache_and_is_not_created_by_reading(tmp_path):
    cache = EmbeddingCache(tmp_path / "absent")
    assert cache.get(["x"]) == {} and cache.dim(["x"]) is None
    assert not (tmp_path / "absent").exists()


def test_encode_reads_the_texts_in_blocks_and_embeds_each_text_once(tmp_path, monkeypatch):
    # blocks of 3 rows, chunks of 3 texts: repeats within a block, across blocks and across a chunk boundary
    texts = ["a cat", "a dog", "a cat", "a fish", "a bird", "a dog", "a cow", "a cat", "a cow", "a hen", "an ox"]
    want = Embedder(cache=False).encode(texts)
    monkeypatch.setattr(embed, "CHUNK", 3)
    seen: list[str] = []
    real = Embedder._encode_alone

    def counting(self, batch):
        seen.extend(batch)
        return real(self, batch)

    monkeypatch.setattr(Embedder, "_encode_alone", counting)
    got = Embedder(cache_root=tmp_path).encode(texts)
    np.testing.assert_array_equal(got, want)
    assert sorted(seen) == sorted(set(texts))  # each distinct text embedded once
    assert len(list(tmp_path.rglob("*.npz"))) == 3  # 7 distinct texts in chunks of 3
    seen.clear()
    np.testing.assert_array_equal(Embedder(cache_root=tmp_path).encode(texts[::-1]), want[::-1])
    assert seen == []
