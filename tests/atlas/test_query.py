"""`refusal-atlas query`: node, direction, source, sparql — library and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from fixtures.atlas.builder import D_MODEL, LAYERS, NODES, POSITIONS, build_atlas, full_atlas, planted_directions
from refusal_atlas.atlas import query as q
from refusal_atlas.atlas.links import write_atlas_ttl
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.cli.atlas_query import register_query
from refusal_atlas.errors import AtlasError


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    out = full_atlas(tmp_path_factory.mktemp("atlas") / "atlas-out")
    write_atlas_ttl(out)
    return out


@pytest.fixture(scope="module")
def store(atlas) -> AtlasStore:
    return AtlasStore.open(atlas)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer()
    query_app = typer.Typer()
    root.add_typer(query_app, name="query")
    register_query(query_app)
    return root


# ------------------------------------------------------------------------------ node
def test_node_report_has_every_part(store):
    r = q.node_report(store, "health.dosing")
    assert r["label"] == "Medication dosing" and r["default"] == "comply_with_caveats"
    assert r["rules"] == [{"from": "health.dosing", "when": {"user_age": "minor"}, "expect": "redirect",
                           "rationale": "Minors are pointed to an adult or a clinician."}]
    assert len(r["directions"]) == len(LAYERS) * len(POSITIONS)
    assert {"layer", "position", "norm", "noise_floor", "reliability", "auroc"} <= set(r["directions"][0])
    assert (r["best"]["layer"], r["best"]["position"]) == (2, "-1")  # the causal stage's selection
    assert r["best"]["bypass_score"] == pytest.approx(1.0) and r["best"]["selected"]
    assert r["nearest"] and all(n["node"] != "health.dosing" for n in r["nearest"])
    assert r["clusters"] == []  # cluster 2 resembles it but fits no node (score below the threshold)
    assert [c["cluster"] for c in q.node_report(store, "weapons.explosives")["clusters"]] == ["0"]
    assert {row["evaluated"] for row in r["cross_ablation"]} == set(NODES)
    assert {row["method"] for row in r["cross_ablation"]} == {"diff_means", "residual"}
    assert [row["condition"] for row in r["condition_table"]] == ["(none)", "user_age=minor"]
    json.dumps(r)  # JSON-ready, NaN-free


def test_node_nearest_uses_overlap_edges_when_present(store):
    edges = store.overlap_edges("overlap")
    assert edges, "the fixture plants overlapping nodes"
    a = edges[0][0]
    own = {(y if x == a else x): d["weight"] for x, y, d in edges if a in (x, y)}
    best = max(own, key=own.get)
    near = q.node_report(store, a)["nearest"]
    assert near[0]["source"] == "overlap" and near[0]["node"] == best
    assert near[0]["cosine"] == pytest.approx(own[best])


def test_unknown_node_suggests_a_close_id(store):
    with pytest.raises(AtlasError, match=r"did you mean weapons\.explosives"):
        q.node_report(store, "weapons.explosive")


# ------------------------------------------------------------------------------ direction
@pytest.mark.parametrize("node", NODES)
def test_planted_direction_ranks_its_node_first(store, node):
    vec = torch.tensor(planted_directions()[node], dtype=torch.float32)
    result = q.rank_direction(store, vec)
    top = result["ranking"][0]
    assert top["node"] == node and top["rank"] == 1
    assert top["cosine"] > 0.9
    assert top["noise_floor"] is not None and top["ceiling"] is not None
    assert result["pooled"]["node"] == "@pooled"


def test_vector_files_in_every_format(store, tmp_path):
    v = planted_directions()["weapons.cbrn"].astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    torch.save(torch.from_numpy(v), tmp_path / "v.pt")
    save_file({"direction": torch.from_numpy(v)}, str(tmp_path / "v.safetensors"))
    stacked = torch.from_numpy(np.stack([v] * len(LAYERS)))
    torch.save({"refusal": stacked}, tmp_path / "layers.pt")
    for name in ("v.npy", "v.pt", "v.safetensors"):
        vec = q.load_vector(tmp_path / name)
        assert q.rank_direction(store, vec, layer=2, position="-1")["ranking"][0]["node"] == "weapons.cbrn"
    per_layer = q.load_vector(tmp_path / "layers.pt")
    assert per_layer.shape == (len(LAYERS), D_MODEL)
    assert q.rank_direction(store, per_layer)["ranking"][0]["node"] == "weapons.cbrn"


def test_residual_method_and_unknown_method(store):
    vec = torch.tensor(planted_directions()["weapons.cbrn"], dtype=torch.float32)
    result = q.rank_direction(store, vec, method="residual", layer=3)
    assert len(result["ranking"]) == len(NODES) and result["pooled"] is None  # no pooled residual
    assert all(r["noise_floor"] is not None for r in result["ranking"])
    with pytest.raises(AtlasError, match="method"):
        q.rank_direction(store, vec, method="pca")


def test_wrong_d_model_is_a_clear_error(store):
    with pytest.raises(AtlasError, match=f"d=7 .*d_model={D_MODEL}"):
        q.rank_direction(store, torch.ones(7), source="x.npy")


def test_vector_file_errors(tmp_path):
    save_file({"a": torch.ones(3), "b": torch.ones(3)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(AtlasError, match="--key"):
        q.load_vector(tmp_path / "two.safetensors")
    assert q.load_vector(tmp_path / "two.safetensors", key="b").shape == (3,)
    torch.save({"not": "a tensor", "fn": print}, tmp_path / "evil.pt")  # weights_only refuses arbitrary objects
    with pytest.raises(AtlasError, match="could not read"):
        q.load_vector(tmp_path / "evil.pt")
    (tmp_path / "v.txt").write_text("1 2 3")
    with pytest.raises(AtlasError, match="unsupported"):
        q.load_vector(tmp_path / "v.txt")
    np.save(tmp_path / "nan.npy", np.array([np.nan, 1.0], dtype=np.float32))
    with pytest.raises(AtlasError, match="NaN"):
        q.load_vector(tmp_path / "nan.npy")


# ------------------------------------------------------------------------------ source
def test_source_maps_external_category_to_nodes_and_directions(store):
    r = q.source_report(store, "llamaguard3:S9")
    assert {n["node"] for n in r["nodes"]} == {"weapons.cbrn", "weapons.explosives"}
    assert all(n["best"]["layer"] in LAYERS for n in r["nodes"])


def test_source_reaches_descendants_with_directions(store):
    r = q.source_report(store, "llamaguard3:S14")
    by_node = {n["node"]: n for n in r["nodes"]}
    assert by_node["cyber"]["best_of"] == "cyber" and by_node["cyber"]["best"]["set"] == "tree"  # the tree set's
    assert by_node["cyber.malware"]["via"] == "cyber" and by_node["cyber.malware"]["best"]["set"] == "branches"
    health = q.source_report(store, "llamaguard3:S6")["nodes"]
    misc = next(n for n in health if n["node"] == "health.misc") if any(n["node"] == "health.misc" for n in health) \
        else None
    assert misc is None or (misc["best_of"] == "health" and "not analysed" in misc["why"])


def test_unknown_source_lists_known_categories(store):
    with pytest.raises(AtlasError, match="llamaguard3:S9"):
        q.source_report(store, "llamaguard3:S99")


# ------------------------------------------------------------------------------ sparql
def test_sparql_select_ask_and_errors(store, tmp_path):
    r = q.sparql(store, """SELECT ?layer (COUNT(?d) AS ?n) WHERE {
        ?d a ra:RefusalDirection ; ra:forNode ?node ; ra:layer ?layer .
        ?node skos:notation "cyber.malware" } GROUP BY ?layer ORDER BY ?layer""")
    assert r["vars"] == ["layer", "n"]
    assert [row[0] for row in r["rows"]] == LAYERS
    assert all(row[1] == len(POSITIONS) for row in r["rows"])
    assert q.sparql(store, "ASK { ?c a ra:Cluster ; ra:mapsToNode ?n }") == {"type": "ASK", "answer": True}
    file = tmp_path / "q.rq"
    file.write_text("SELECT ?c WHERE { ?c a ra:Cluster }")
    assert len(q.sparql(store, str(file))["rows"]) == 6  # 4 prompt clusters + 2 refusal-wording clusters
    with pytest.raises(AtlasError, match="SPARQL"):
        q.sparql(store, "SELECT WHERE {")
    with pytest.raises(AtlasError, match="SERVICE"):  # never reaches the network
        q.sparql(store, "SELECT ?s WHERE { SERVICE <http://example.org/sparql> { ?s ?p ?o } }")


# ------------------------------------------------------------------------------ CLI
def test_cli_json_outputs(app, atlas, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["query", "node", "cyber.malware", "--atlas", str(atlas), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["node"] == "cyber.malware"
    np.save(tmp_path / "v.npy", planted_directions()["health.dosing"].astype(np.float32))
    res = runner.invoke(app, ["query", "direction", str(tmp_path / "v.npy"), "--atlas", str(atlas), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ranking"][0]["node"] == "health.dosing"
    res = runner.invoke(app, ["query", "source", "llamaguard3:S9", "--atlas", str(atlas), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["source"] == "llamaguard3:S9"
    res = runner.invoke(app, ["query", "sparql", "ASK { ?d a ra:RefusalDirection }", "--atlas", str(atlas),
                              "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["answer"] is True


def test_cli_tables_render_text_without_markup(app, atlas):
    res = CliRunner().invoke(app, ["query", "node", "weapons.explosives", "--atlas", str(atlas)])
    assert res.exit_code == 0, res.output
    assert "nearest nodes" in res.output and "directions of weapons.explosives (branch set" in res.output
    assert "reliability = split-half correlation" in res.output  # the table has a legend
    assert "selected direction: layer 2, position -1" in res.output
    assert "other positions: last_instruction" in res.output
    res2 = CliRunner().invoke(app, ["query", "node", "weapons.explosives", "--atlas", str(atlas),
                                    "--position", "last_instruction"])
    assert "position last_instruction, by layer" in res2.output
    assert "<script>alert(1)</script>" in res.output  # a cluster label shown verbatim, not as rich markup
    res = CliRunner().invoke(app, ["query", "source", "llamaguard3:S9", "--atlas", str(atlas)])
    assert res.exit_code == 0 and "weapons.cbrn" in res.output


def test_cli_missing_atlas_is_an_atlas_error(app, tmp_path):
    res = CliRunner().invoke(app, ["query", "node", "x", "--atlas", str(tmp_path / "absent")])
    assert res.exit_code != 0
    assert isinstance(res.exception, AtlasError) and "refusal-atlas run" in str(res.exception)


def test_cli_missing_stage_is_an_atlas_error(app, tmp_path):
    out = build_atlas(tmp_path / "tax-only", stages=("taxonomy",))
    np.save(tmp_path / "v.npy", np.ones(D_MODEL, dtype=np.float32))
    res = CliRunner().invoke(app, ["query", "direction", str(tmp_path / "v.npy"), "--atlas", str(out)])
    assert isinstance(res.exception, AtlasError) and "refusal-atlas run" in str(res.exception)
    node = q.node_report(AtlasStore.open(out), "health")
    assert node["directions"] is None and node["cross_ablation"] is None


def test_real_cli_missing_atlas_one_line_no_traceback(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "refusal_atlas.cli", "query", "node", "weapons",
                          "--atlas", str(tmp_path / "absent")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refusal-atlas run" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------ honest rankings
def test_default_comparison_is_at_the_selected_layer_and_position(store):
    vec = torch.tensor(planted_directions()["weapons.cbrn"], dtype=torch.float32)
    r = q.rank_direction(store, vec)
    assert r["layers"] == [2] and r["position"] == "-1" and r["layer_choice"] == "selected by the causal stage"
    assert q.rank_direction(store, vec, all_layers=True)["layers"] == LAYERS


def test_planted_direction_is_above_chance(store):
    vec = torch.tensor(planted_directions()["weapons.cbrn"], dtype=torch.float32)
    top = q.rank_direction(store, vec, all_layers=True)["ranking"][0]
    assert top["node"] == "weapons.cbrn" and top["above_chance"] and top["p_value"] < 0.01


@pytest.mark.parametrize("all_layers", [False, True])
def test_p_values_of_random_vectors_are_calibrated(store, all_layers):
    """Random directions are above chance about 5% of the time, also when the best of 4 layers is taken."""
    gen = torch.Generator().manual_seed(1)
    flags, naive = [], []
    for _ in range(30):
        vec = torch.randn(D_MODEL, generator=gen)
        r = q.rank_direction(store, vec, all_layers=all_layers, draws=400)
        flags += [row["above_chance"] for row in r["ranking"]]
        naive += [row["cosine"] > row["chance_cosine_95"] for row in r["ranking"]]
        assert all(0 < row["p_value"] <= 1 for row in r["ranking"])
    assert len(flags) == 30 * (len(NODES) + 3)  # the branch nodes and the tree set's three roots
    # corrected for the nodes searched too: a random vector has *some* row flagged about 5% of the time
    per_vector = [any(flags[i:i + len(NODES) + 3]) for i in range(0, len(flags), len(NODES) + 3)]
    assert sum(per_vector) <= 5, sum(per_vector)
    assert abs(sum(flags) - sum(naive)) <= 3  # the flag and the family null's 95th percentile tell the same story


def test_zero_or_nan_vectors_are_one_line_errors(store, app, atlas, tmp_path):
    with pytest.raises(AtlasError, match="all zeros"):
        q.rank_direction(store, torch.zeros(D_MODEL))
    with pytest.raises(AtlasError, match="NaN"):
        q.rank_direction(store, torch.full((D_MODEL,), float("nan")))
    np.save(tmp_path / "zero.npy", np.zeros(D_MODEL, dtype=np.float32))
    with pytest.raises(AtlasError, match="all zeros"):
        q.load_vector(tmp_path / "zero.npy")
    res = CliRunner().invoke(app, ["query", "direction", str(tmp_path / "zero.npy"), "--atlas", str(atlas)])
    assert isinstance(res.exception, AtlasError) and "\n" not in str(res.exception)


def test_ranking_table_flags_chance_and_explains_match(app, atlas, tmp_path):
    np.save(tmp_path / "r.npy", np.random.default_rng(3).normal(size=D_MODEL).astype(np.float32))
    res = CliRunner().invoke(app, ["query", "direction", str(tmp_path / "r.npy"), "--atlas", str(atlas)])
    assert res.exit_code == 0, res.output
    assert "match = cosine / ceiling" in res.output and "random unit directions" in res.output
    data = json.loads(CliRunner().invoke(app, ["query", "direction", str(tmp_path / "r.npy"), "--atlas", str(atlas),
                                               "--json"]).output)
    assert all({"p_value", "above_chance"} <= set(row) for row in data["ranking"])
    if not any(row["above_chance"] for row in data["ranking"]):
        assert "n.s." in res.output and "not significant" in res.output and "no node is above chance" in res.output


def test_unanalysed_node_falls_back_to_its_nearest_analysed_ancestor(store):
    r = q.node_report(store, "health.misc")  # in the taxonomy, no prompt of its own
    assert r["fallback"]["ancestor"] == "health" and "not analysed" in r["fallback"]["reason"]
    assert "no harmful prompt" in r["fallback"]["reason"] and r["fallback"]["prompts"]["train_prompts"] == 0
    assert r["directions_of"] == "health" and r["direction_set"] == "tree"
    assert len(r["directions"]) == len(LAYERS) * len(POSITIONS)
    assert r["best"]["layer"] == 2 and r["best"]["position"] == "-1"  # the selected layer and position
    assert q.node_report(store, "health.dosing")["fallback"] is None
    weapons = q.node_report(store, "weapons")  # a tree node: its own direction, nearest nodes of its depth
    assert weapons["fallback"] is None and weapons["direction_set"] == "tree"
    assert {n["node"] for n in weapons["nearest"]} == {"cyber", "health"}
    assert all(n["debiased_ci_low"] <= n["cos_debiased"] <= n["debiased_ci_high"] for n in weapons["nearest"])
    # the tree root pools its leaves: its direction sits between theirs
    ds = store.tree_directions
    leaves = store.directions.unit("weapons.cbrn", 2, -1) + store.directions.unit("weapons.explosives", 2, -1)
    assert float(ds.unit("weapons", 2, -1) @ (leaves / leaves.norm())) > 0.95
    json.dumps(weapons)  # JSON-ready


def test_terminal_output_never_interprets_markup():
    from rich.console import Console

    from refusal_atlas.cli.atlas_query import show_node, show_ranking, show_source, show_sparql

    evil = "[/] [link=https://evil.example]here[/link] [bold]x"
    console = Console(record=True, width=200, highlight=False)
    show_node({"node": evil, "label": evil, "definition": evil, "default": "refuse", "broader": [evil],
               "rules": [{"from": evil, "when": {"a": evil}, "expect": "refuse", "rationale": evil}],
               "directions": [], "fallback": {"reason": evil, "note": evil, "ancestor": None},
               "nearest": [{"node": evil, "label": evil, "cosine": 0.5, "source": "directions"}],
               "clusters": [{"cluster": "0", "label": evil, "size": 1, "score": 0.1}],
               "cross_ablation": None, "condition_table": [], "adherence": None}, console)
    show_ranking({"source": evil, "shape": [3], "position": evil, "layers": [1], "layer_choice": evil,
                  "chance": {"draws": 10, "seed": 0, "alpha": 0.05}, "pooled": None,
                  "ranking": [{"rank": 1, "node": evil, "label": evil, "cosine": 0.1, "p_value": 0.5,
                               "above_chance": False, "layer": 1}]}, console, 5)
    show_source({"source": evil, "label": evil, "directions_available": True,
                 "nodes": [{"node": evil, "label": evil, "predicate": evil, "best": None, "why": evil,
                            "fallback": evil}]}, console)
    show_sparql({"type": "SELECT", "vars": [evil], "rows": [[evil]]}, console)
    text = console.export_text()
    assert text.count("[link=https://evil.example]here[/link]") >= 10
    assert "evil.example" not in "".join(str(s.style) for s in console._record_buffer if s.style)
