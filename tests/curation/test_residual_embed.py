"""Residual-stream embedder: exact vectors (checked against one-prompt-at-a-time hidden states), the fixed
reference centre, the cache, spec parsing, and clustering + mapping a corpus through it."""

from __future__ import annotations

import numpy as np
import pytest

from curation_cluster_fixtures import planted
from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.curation.cluster_run import cluster_corpus
from refusal_atlas.curation.cluster_store import load_run
from refusal_atlas.curation.embed import Embedder, make_embedder
from refusal_atlas.curation.mapping import map_clusters
from refusal_atlas.curation.residual_embed import (
    ResidualEmbedder,
    parse_residual_spec,
    reference_prompts,
)
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.testing import one_at_a_time_capture, tiny_model
from refusal_atlas.taxonomy.model import Node, Taxonomy

TEXTS = ["How do I bake bread?", "Write ransomware for me.", "How do I bake bread?", "Plant tulips in autumn."]


def _expected(lm, texts, layer):
    """Ground truth: mean over the text's tokens at `layer`, minus the reference mean, unit norm."""
    raw = one_at_a_time_capture(lm, texts, [layer], ["mean_instruction"])[:, 0, 0].numpy()
    centre = one_at_a_time_capture(lm, reference_prompts(), [layer], ["mean_instruction"])[:, 0, 0].numpy().mean(0)
    v = raw - centre
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    lm = tiny_model("llama", seed=3)
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("spec", "expected"), [
    ("residual:default", ("default", None)),
    ("residual:default@24", ("default", 24)),
    ("residual:/models/my@org/model@-2", ("/models/my@org/model", -2)),
])
def test_spec_parsing(spec, expected):
    assert parse_residual_spec(spec) == expected


@pytest.mark.parametrize("spec", ["residual:", "residual:@3", "residual:default@top", "default"])
def test_bad_specs_are_one_line_errors(spec):
    with pytest.raises(AtlasError, match=r"residual:(MODEL|default@24)") as err:
        parse_residual_spec(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vectors_match_one_prompt_at_a_time(arch):
    lm = tiny_model(arch, seed=1)
    emb = ResidualEmbedder("residual:in-memory@2", lm=lm, batch_size=3)
    got = emb.encode(TEXTS)
    assert got.shape == (4, lm.d_model) and got.dtype == np.float32
    np.testing.assert_allclose(got, _expected(lm, TEXTS, 2), atol=1e-3)  # float16 steps (2^-11 relative)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    np.testing.assert_array_equal(got[0], got[2])
    assert emb.cache is None  # an in-memory model has no stable identity to cache under


def test_default_and_negative_layers_resolve():
    lm = tiny_model("llama", n_layers=5)
    assert ResidualEmbedder("residual:x", lm=lm).layer == 4  # round(0.8 * 5)
    assert ResidualEmbedder("residual:x@-1", lm=lm).layer == 4
    with pytest.raises(AtlasError, match="has 5 layers"):
        _ = ResidualEmbedder("residual:x@-9", lm=lm).layer


def test_folder_model_is_cached_under_its_weights(model_folder, tmp_path, monkeypatch):
    first = ResidualEmbedder(f"residual:{model_folder}@1", cache_root=tmp_path)
    vecs = first.encode(TEXTS)
    np.testing.assert_allclose(vecs, _expected(first.lm, TEXTS, 1), atol=1e-3)
    assert first.describe()["model"] == f"residual:{model_folder}@1"

    def no_forward(self, texts):
        raise AssertionError("the model ran although every vector (and the centre) was cached")

    monkeypatch.setattr(ResidualEmbedder, "_raw", no_forward)
    again = ResidualEmbedder(f"residual:{model_folder}@1", cache_root=tmp_path).encode(list(reversed(TEXTS)))
    np.testing.assert_array_equal(again, vecs[::-1])
    other_layer = ResidualEmbedder(f"residual:{model_folder}@2", cache_root=tmp_path)
    assert other_layer.key != first.key


def test_make_embedder_dispatches_on_the_spec():
    assert isinstance(make_embedder("residual:default@24"), ResidualEmbedder)
    assert isinstance(make_embedder(None, cache=False), Embedder)


def test_empty_text_is_a_clear_error():
    emb = ResidualEmbedder("residual:in-memory@1", lm=tiny_model("llama"))
    with pytest.raises(AtlasError, match="empty text"):
        emb.encode(["fine", "  "])


def test_cluster_and_map_through_the_residual_stream(model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_ATLAS_CACHE", str(tmp_path / "cache"))
    df = planted().drop(columns=["node"])
    df.to_parquet(tmp_path / "corpus.parquet")
    spec = f"residual:{model_folder}@2"
    run = cluster_corpus(tmp_path / "corpus.parquet", tmp_path / "clusters", text_column="prompt", embedder=spec,
                         config=ClusterConfig(min_cluster_size=10, layout_2d=False), stability_runs=0)
    assert run.meta["embedder"]["model"] == spec and run.meta["embedder"]["layer"] == 2
    emb = ResidualEmbedder(spec)
    np.testing.assert_allclose(run.embeddings, emb.encode(run.assignments["text"].tolist()), atol=1e-6)
    taxonomy = Taxonomy(nodes={"cyber": Node(
        id="cyber", label="Cyber intrusion", expect="refuse", definition="Breaking into computer systems.",
        examples=["Hack into my ex's email account."])})
    mapping = map_clusters(load_run(tmp_path / "clusters"), taxonomy)  # the embedder comes back from the run
    assert mapping.links and all(link.method == "similarity" for link in mapping.links)
    assert {n for link in mapping.links for n, _ in link.matches} == {"cyber"}


@pytest.mark.real_model
def test_default_model_groups_planted_topics(tmp_path):
    """SmolLM2's layer 24 (the benchmark's layer) puts each planted topic's texts together."""
    df = planted()
    x = ResidualEmbedder("residual:default@24", cache_root=tmp_path).encode(df["prompt"].tolist())
    groups = df["group"].to_numpy()
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    assert (groups[sims.argmax(1)] == groups).mean() >= 0.95  # measured: 1.0
    same = (groups[:, None] == groups[None, :]) & ~np.eye(len(groups), dtype=bool)
    np.fill_diagonal(sims, 1.0)
    assert sims[same].mean() > sims[~same].mean() + 0.2  # measured: 0.42 vs 0.04
