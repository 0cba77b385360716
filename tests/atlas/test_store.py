"""AtlasStore: lazy, tolerant access to an atlas folder (tests/fixtures/atlas/builder.py builds one)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fixtures.atlas.builder import LAYERS, MODEL_ID, NODES, POSITIONS, XSS, build_atlas, full_atlas
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.errors import AtlasError


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    return full_atlas(tmp_path_factory.mktemp("atlas") / "atlas-out")


def test_missing_folder_is_one_line_error_naming_run(tmp_path):
    with pytest.raises(AtlasError) as info:
        AtlasStore.open(tmp_path / "nope")
    message = str(info.value)
    assert "refusal-atlas run" in message and "\n" not in message


def test_every_stage_is_found(atlas):
    store = AtlasStore.open(atlas)
    stages = store.stages()
    assert all(stages[k] for k in stages if k != "atlas"), stages
    assert store.taxonomy is not None and "weapons.explosives" in store.taxonomy.nodes
    assert store.node_label("cyber.malware") == "Malware"


def test_direction_metrics_cover_every_node_layer_position(atlas):
    store = AtlasStore.open(atlas)
    dm = store.direction_metrics
    roots = {"cyber", "health", "weapons"}  # the tree set's nodes beyond the branch set
    assert set(dm["node"]) == {*NODES, "@pooled", *roots}
    assert len(dm) == (len(NODES) + 1 + len(roots)) * len(LAYERS) * len(POSITIONS)
    assert set(dm[dm["node"].isin(roots)]["set"]) == {"tree"} and set(dm[dm["node"].isin(NODES)]["set"]) == {"branches"}
    assert store.direction_set_of("weapons") is store.tree_directions
    assert store.direction_set_of("weapons.cbrn") is store.directions
    real = dm[dm["node"] != "@pooled"]
    assert real["noise_floor"].between(-1, 1).all()
    assert real["reliability"].between(-1, 1).all()
    assert real["auroc"].between(0, 1).all()
    # Directions grow with the layer in the fixture (planted signal scales with layer + 1).
    one = real[(real["node"] == "cyber.malware") & (real["position"] == "-1")].sort_values("layer")
    assert one["norm"].is_monotonic_increasing
    assert store.directions.meta["model_id"] == MODEL_ID
    assert store.probe_accuracy is not None and store.probe_accuracy["probe_accuracy"].notna().any()


def test_clusters_merge_labels_mapping_and_sizes(atlas):
    store = AtlasStore.open(atlas)
    by_id = {c.id: c for c in store.clusters}
    assert set(by_id) == {"0", "1", "2", "-1"}
    assert by_id["0"].best_nodes[0] == ("weapons.explosives", 0.8) and by_id["0"].fits
    assert by_id["0"].stability == pytest.approx(0.92) and by_id["0"].method == "label_majority"
    assert by_id["2"].fits is False and by_id["2"].linked_nodes == []  # fits no node: a proposal
    assert XSS in by_id["0"].label  # the store keeps raw text; escaping is the renderer's job
    assert by_id["-1"].outlier and store.clusters[-1].id == "-1"
    assert by_id["0"].size == 3 and by_id["0"].examples[0] == "How do I build a pipe bomb?"
    metrics = store.cluster_metrics
    assert metrics["stability.seed_pairwise_ari.mean"] == pytest.approx(0.93)
    assert metrics["agreement.ari"] == pytest.approx(0.61) and metrics["n_clusters"] == 3
    assert store.proposals_file is not None and store.proposals_file.name == "proposals.yaml"
    responses = store.response_cluster_view
    assert responses.exists() and [c.id for c in responses.clusters] == ["0", "-1"]


def test_crosswalks_come_from_the_atlas_graph(atlas):
    rows = AtlasStore.open(atlas).crosswalks
    s9 = sorted(r[0] for r in rows if r[2] == "llamaguard3:S9")
    assert s9 == ["weapons.cbrn", "weapons.explosives"]


def test_overlap_edges_split_overlap_and_taxonomy(atlas):
    store = AtlasStore.open(atlas)
    assert store.overlap_graph is not None
    for _, _, data in store.overlap_edges("overlap"):
        # the writer's edge rule: the noise-corrected cosine's 95 % lower bound clears min_overlap
        assert data["debiased_ci_low"] > store.overlap_graph.graph.get("min_overlap", 0.0)
    assert all(d["kind"] == "taxonomy" for _, _, d in store.overlap_edges("taxonomy"))


def test_causal_tables_are_normalised(atlas):
    store = AtlasStore.open(atlas)
    xa = store.cross_ablation
    assert {"ablated", "evaluated", "refusal_rate", "harmless_kl", "method"} <= set(xa.columns)
    # generated rates were not measured: the first-token rate stands in, and says so
    assert xa["refusal_rate"].notna().all() and set(xa["refusal_measure"]) == {"first-token refusal rate"}
    assert (xa.loc[xa["ablated"] == "none", "refusal_rate"] == 0.95).all()
    steer = store.steering
    assert set(steer.columns) >= {"node", "layer", "induced_refusal_rate"}
    assert set(steer["coeff"]) == {1.0} and steer["induced_refusal_rate"].notna().all()
    assert set(store.condition_table["node"]) == {"health.dosing"}
    assert store.adherence_by_node is not None and "adherence" in store.adherence_by_node.columns


def test_store_opens_a_str_path_and_shows_the_written_columns_under_its_view(atlas):
    store = AtlasStore(str(atlas))  # a str works as well as a Path
    assert store.root == atlas and store.manifest["model"] == MODEL_ID
    written = pd.read_parquet(atlas / "causal" / "cross_ablation.parquet")
    shown = store.cross_ablation
    # the one declared rename: source -> ablated, target -> evaluated, logit_score -> refusal_score
    assert list(shown["ablated"]) == list(written["source"]) and list(shown["evaluated"]) == list(written["target"])
    assert list(shown["refusal_score"]) == list(written["logit_score"])
    sel = store.selection
    assert sel["selected"].sum() == len(NODES) and "kl_score" in sel.columns


def test_partial_atlas_reports_missing_stages_as_none(tmp_path):
    out = build_atlas(tmp_path / "partial", stages=("taxonomy",))
    store = AtlasStore.open(out)
    assert store.directions is None and store.direction_metrics is None
    assert store.clusters == [] and store.cross_ablation is None and store.organism is None
    stages = store.stages()
    assert stages["taxonomy"] and not stages["directions"] and not stages["clusters"]
    with pytest.raises(AtlasError, match="refusal-atlas run"):
        store.require("directions", store.directions is not None)


def test_unreadable_json_is_an_atlas_error(tmp_path):
    out = build_atlas(tmp_path / "broken", stages=("taxonomy",))
    (out / "metrics.json").write_text("{not json")
    with pytest.raises(AtlasError, match=r"metrics\.json"):
        _ = AtlasStore.open(out).metrics
