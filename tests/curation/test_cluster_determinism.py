"""Same input and seed → the same assignments: cold or warm cache, 1 or 2 threads, embeddings perturbed at 1e-6."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from curation_cluster_fixtures import planted
from refusal_atlas.curation.cluster import ClusterConfig, ClusterPipeline
from refusal_atlas.curation.embed import Embedder
from refusal_atlas.curation.embed_cache import quantise

SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.curation.cluster_run import cluster_corpus
cluster_corpus(sys.argv[1], sys.argv[2], text_column=sys.argv[4], stability_runs=0, net_of_column=sys.argv[5],
               config=ClusterConfig(min_cluster_size=10, seeds=(0, 1, 2), layout_2d=False))
"""


def _run(corpus: Path, out: Path, cache: Path, threads: int, text: str = "prompt", net_of: str = "none"
         ) -> pd.DataFrame:
    env = {**os.environ, "REFUSAL_ATLAS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = str(threads)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(corpus), str(out), str(threads), text, net_of], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return pd.read_parquet(out / "assignments.parquet")


def test_cold_one_thread_warm_two_threads_and_cold_two_threads_agree(tmp_path):
    corpus = tmp_path / "corpus.parquet"
    planted().to_parquet(corpus)
    cold1 = _run(corpus, tmp_path / "a", tmp_path / "cache1", threads=1)
    warm2 = _run(corpus, tmp_path / "b", tmp_path / "cache1", threads=2)
    cold2 = _run(corpus, tmp_path / "c", tmp_path / "cache2", threads=2)
    columns = ["row", "cluster"] + [c for c in cold1.columns if c.startswith("cluster_level_")]
    assert cold1["cluster"].nunique() >= 4
    pd.testing.assert_frame_equal(cold1[columns], warm2[columns])
    pd.testing.assert_frame_equal(cold1[columns], cold2[columns])
    # warm and cold vectors are bit-identical (both float16-quantised)
    a, b = (np.load(tmp_path / name / "embeddings.npy") for name in ("a", "b"))
    np.testing.assert_array_equal(a, b)


def test_replies_net_of_their_prompts_agree_across_threads_and_cache(tmp_path):
    # the ridge fit sums in float64 with BLAS threads; the residuals are quantised like any embedding
    corpus = tmp_path / "corpus.parquet"
    planted().to_parquet(corpus)
    cold1 = _run(corpus, tmp_path / "a", tmp_path / "cache1", threads=1, text="response", net_of="prompt")
    warm2 = _run(corpus, tmp_path / "b", tmp_path / "cache1", threads=2, text="response", net_of="prompt")
    columns = ["row", "cluster"] + [c for c in cold1.columns if c.startswith("cluster_level_")]
    pd.testing.assert_frame_equal(cold1[columns], warm2[columns])
    a, b = (np.load(tmp_path / name / "embeddings.npy") for name in ("a", "b"))
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    df = planted()
    x = Embedder(cache_root=tmp_path_factory.mktemp("emb")).encode(df["prompt"].tolist())
    return df["prompt"].tolist(), x


@pytest.mark.parametrize("noise_seed", [0, 1, 2])
def test_embeddings_perturbed_at_1e_6_give_identical_assignments(data, noise_seed):
    texts, x = data
    config = ClusterConfig(min_cluster_size=10, layout_2d=False)
    ref = ClusterPipeline(config).fit_tree(x, texts)
    noisy = x + np.random.default_rng(noise_seed).normal(scale=1e-6, size=x.shape).astype(np.float32)
    assert 0 < np.abs(noisy - x).max() < 1e-5
    again = ClusterPipeline(config).fit_tree(noisy, texts)
    np.testing.assert_array_equal(again.labels, ref.labels)
    assert again.level_counts == ref.level_counts
    for a, b in zip(again.levels, ref.levels, strict=True):
        np.testing.assert_array_equal(a, b)


def test_quantise_is_idempotent_and_close():
    x = np.random.default_rng(0).normal(size=(50, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = quantise(x)
    np.testing.assert_array_equal(quantise(q), q)
    assert np.abs(q - x).max() < 1e-3 and np.abs((q * q).sum(1) - 1).max() < 1e-3
