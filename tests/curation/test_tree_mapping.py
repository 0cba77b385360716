"""The cluster tree against the taxonomy tree: the top level ↔ branches, the leaves ↔ nodes, on planted groups."""

from __future__ import annotations

import json

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from curation_cluster_fixtures import planted
from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.curation.cluster_run import cluster_corpus
from refusal_atlas.curation.map_folder import map_folder
from refusal_atlas.taxonomy.model import Node

# two branches of two nodes each; the planted topics are the nodes
NODES = [
    Node(id="crime", label="Crime", definition="Committing crimes against people, property or systems.",
         expect="refuse"),
    Node(id="crime.cyber", label="Cyber intrusion", broader=["crime"],
         definition="Breaking into computer systems, networks or accounts, stealing passwords, writing malware."),
    Node(id="crime.weapons", label="Weapons", broader=["crime"],
         definition="Building, acquiring or concealing guns, bombs, explosives or chemical weapons."),
    Node(id="home", label="Home life", definition="Everyday household activities.", expect="comply"),
    Node(id="home.cooking", label="Cooking", broader=["home"],
         definition="Recipes, baking, roasting, spices and cooking food for dinner."),
    Node(id="home.garden", label="Gardening", broader=["home"],
         definition="Growing plants, flowers and vegetables in a garden: planting, watering, soil and pests."),
]
NODE_OF = {"cooking": "home.cooking", "hacking": "crime.cyber", "weapons": "crime.weapons", "gardening": "home.garden"}
BRANCH_OF = {"cooking": "home", "hacking": "crime", "weapons": "crime", "gardening": "home"}


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("tree-map")
    mp.setenv("REFUSAL_ATLAS_CACHE", str(root / "cache"))
    (root / "tax").mkdir()
    YAML().dump({"nodes": [n.to_yaml_dict() for n in NODES]}, root / "tax" / "01-nodes.yaml")
    df = planted().assign(node=lambda d: d["group"].map(NODE_OF))
    out = {}
    try:
        for name, table in (("labelled", df), ("unlabelled", df.drop(columns=["node"]))):
            table.to_parquet(root / f"{name}.parquet")
            run = cluster_corpus(root / f"{name}.parquet", root / name, text_column="prompt", stability_runs=0,
                                 config=ClusterConfig(min_cluster_size=10, layout_2d=False))
            _, _, written = map_folder(run.folder, root / "tax")
            out[name] = (run, json.loads(written["mapping"].read_text())["tree"])
        yield root, out
    finally:
        mp.undo()


def _group(run, level, cluster):
    rows = run.assignments[run.assignments[f"cluster_level_{level}"] == cluster]
    return set(planted().set_index("prompt")["group"][rows["text"]])


@pytest.mark.parametrize("name, method", [("labelled", "label_majority"), ("unlabelled", "similarity")])
def test_the_top_clusters_are_linked_to_their_branches(mapped, name, method):
    run, tree = mapped[1][name]
    top = tree["branch_level"]
    assert top["n_clusters"] == 2 and len(top["clusters"]) == 2
    for link in top["clusters"]:
        groups = _group(run, top["level"], link["cluster"])
        assert {BRANCH_OF[g] for g in groups} == {link["branch"]}, (groups, link)
        assert link["method"] == method
        if method == "label_majority":
            assert link["score"] == 1.0 and link["fits"]
        else:  # the other branch scores clearly lower
            assert link["runner_up"]["branch"] != link["branch"]
            assert link["score"] > link["runner_up"]["score"] + 0.05, link


def test_labelled_rows_score_every_level_against_branches_and_nodes(mapped):
    _, tree = mapped[1]["labelled"]
    assert tree["branch_level"]["ari"] == 1.0 and tree["branch_level"]["groups"] == 2
    assert tree["node_level"]["ari"] == 1.0 and tree["node_level"]["n_clusters"] == 4
    by_count = {lv["n_clusters"]: lv for lv in tree["levels"]}
    assert by_count[2]["ari_branch"] == 1.0 > by_count[4]["ari_branch"]
    assert by_count[4]["ari_node"] == 1.0 > by_count[2]["ari_node"]
    _, unlabelled = mapped[1]["unlabelled"]
    assert unlabelled["branch_level"]["ari"] is None and "no labelled rows" in unlabelled["branch_level"]["rule"]


def test_cli_map_prints_the_branch_level(mapped):
    from refusal_atlas.cli import app

    root, out = mapped
    result = CliRunner().invoke(app, ["curate", "map", str(out["labelled"][0].folder), "--taxonomy",
                                      str(root / "tax"), "-o", str(root / "cli")])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("tree level"))
    assert "vs the taxonomy's branches" in line and "crime (1.00" in line and "home (1.00" in line
    assert "ARI vs branches 1.000 (n = 120)" in line
