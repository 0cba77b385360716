"""The whole `run` pipeline on a tiny random Llama turned into a (tiny) organism: every stage, resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from refusal_atlas.atlas.pipeline import RunConfig, analysis_nodes, assign_analysis_nodes, run
from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.taxonomy.loader import load_taxonomy

CONTRACT_KEYS = {
    "organism": ["heldout_refusal_rate", "harmless_refusal_rate", "permitted_compliance_rate"],
    "detector": ["f1"],
    "clusters": ["seed_ari", "node_ari"],
    "directions": ["median_noise_floor"],
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", n_layers=4, d_model=64)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def finished(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    cfg = RunConfig(model=str(tiny_folder), out=out, quick=True, organism=True, progress=False,
                    sets=("harmless", "overrefusal", "taxonomy"), min_prompts=4,
                    extra={"sizes": {"collect_limit": 60, "max_new_tokens": 8, "per_node_eval": 4,
                                     "harmless_eval": 8, "max_nodes": 3, "cluster_seeds": 2},
                           "organism": {"max_nodes": 6, "epochs": 1}})
    return cfg, run(cfg)


def test_every_stage_writes_its_files(finished):
    cfg, _ = finished
    out = cfg.out
    for name in ("taxonomy.ttl", "prompts.parquet", "organism/organism.json", "responses.parquet", "corpus.parquet",
                 "clusters/clusters.json", "directions/directions.json", "overlap/overlap.graphml", "atlas.ttl",
                 "report.html", "manifest.json", "metrics.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"taxonomy", "ontology", "prompts", "organism", "collect", "detect", "cluster",
                                       "directions", "overlap", "causal", "atlas"}
    assert manifest["versions"]["torch"] != "absent"
    if not (out / "causal" / "skipped.json").is_file():
        # an organism's base is the restoration scan's reference: every analysed node gets its windows
        rest = pd.read_parquet(out / "causal" / "restoration.parquet")
        comp = pd.read_parquet(out / "causal" / "components.parquet")
        assert set(rest["reference"]) == {cfg.model} and set(rest["node"]) <= set(comp["target"])
        assert all(len(v) == n for v, n in zip(rest["prompt_logit_scores"], rest["n"], strict=True))


def test_the_written_folder_is_what_the_schema_declares(finished):
    """Every declared file of a stage that ran exists and the store reads it; every data file the stages wrote
    into the atlas's own folders is declared."""
    from refusal_atlas.atlas import schema
    from refusal_atlas.atlas.store import AtlasStore

    cfg, _ = finished
    out = cfg.out
    declared = {a.path for a in schema.ARTIFACTS}
    skipped = (out / "causal" / "skipped.json").is_file()  # a tiny random organism may never refuse
    for artifact in schema.ARTIFACTS:
        optional = artifact.stage == "causal" or artifact.path.startswith(("clusters/", "organism/adherence_by"))
        optional |= artifact == schema.TREE_JSON  # written only when some node beyond the branches qualifies
        # a node with too few prompts in a cell gets no geometry, so its projections and causal checks may be absent
        optional |= artifact.stage == "harm" and artifact not in (schema.HARM_JSON, schema.HARM_CELLS,
                                                                  schema.HARM_FINDINGS)
        assert optional or (out / artifact.path).is_file(), artifact.path
    assert skipped or (out / "causal" / "pooled.json").is_file()
    for path in out.rglob("*"):
        rel = path.relative_to(out).as_posix()
        top = rel.split("/")[0]
        if path.is_file() and top in ("causal", "directions", "overlap") and path.suffix in (".parquet", ".json",
                                                                                            ".graphml"):
            assert rel in declared, f"{rel}: written but not in the schema"
    store = AtlasStore(str(out))
    assert store.prompts is not None and store.corpus is not None and store.responses is not None
    assert store.direction_prompts is not None and store.organism is not None and store.adherence is not None
    assert store.overlap_graph is not None and store.metrics and store.manifest and store.report_html
    assert (store.causal_skipped is not None) == skipped
    assert skipped or (store.pooled is not None and store.cross_ablation is not None)


def test_metrics_carry_the_contract_keys(finished):
    cfg, _ = finished
    metrics = json.loads((cfg.out / "metrics.json").read_text())
    for group, keys in CONTRACT_KEYS.items():
        for key in keys:
            assert key in metrics[group], f"{group}.{key}"
    assert 0.0 <= metrics["detector"]["f1"] <= 1.0
    assert len(metrics["directions"]["nodes"]) >= 2
    # every headline figure is the one its stage's own files give (not merely a key the writer always writes)
    out = cfg.out
    held = pd.read_parquet(out / "organism" / "adherence.parquet")

    def rate(category: str, refused: bool = True) -> float | None:
        rows = held[held["category"] == category]["refused"].astype(bool)
        return None if not len(rows) else float((rows if refused else ~rows).mean())

    org = metrics["organism"]
    assert org["heldout_refusal_rate"] == rate("refuse")
    assert org["harmless_refusal_rate"] == rate("harmless")
    assert org["permitted_compliance_rate"] == rate("permitted", refused=False)
    assert org["restricted_refusal_rate"] == rate("restricted")
    assert metrics["directions"]["nodes"] == json.loads((out / "directions" / "directions.json").read_text())["nodes"]
    clusters = json.loads((out / "clusters" / "clusters.json").read_text())
    assert metrics["clusters"]["n_clusters"] == clusters["n_clusters"]
    findings = json.loads((out / "findings.json").read_text())["findings"]
    assert metrics["verdicts"]["n_findings"] == len(findings) > 0
    assert sum(metrics["verdicts"]["by_verdict"].values()) == len(findings)


def test_every_node_with_enough_prompts_has_a_direction_and_the_rest_say_why(finished):
    """coverage.json against an independent count of prompts.parquet; every analysed node has floors."""
    from refusal_atlas.atlas.store import AtlasStore
    from refusal_atlas.mechinterp.tree import primary_path

    cfg, _ = finished
    tax = load_taxonomy()
    prompts = pd.read_parquet(cfg.out / "prompts.parquet")
    prompts = prompts[prompts["prompt"].str.len() <= cfg.sizes()["max_prompt_chars"]]
    pool = prompts[prompts["harmful"] & (prompts["condition"] == "") & (prompts["expected"] == "refuse")
                   & (prompts["run_split"] == "train") & (prompts["analysis_node"] != "")].drop_duplicates("prompt")
    counts: dict[str, int] = {}
    for node in pool["node"]:
        for n in primary_path(tax, node):
            counts[n] = counts.get(n, 0) + 1
    cov = {r["node"]: r for r in json.loads((cfg.out / "directions" / "coverage.json").read_text())["nodes"]}
    assert set(cov) == set(tax.nodes)
    store = AtlasStore(cfg.out)
    analysed = set(store.analysed_nodes)
    dm = store.direction_metrics
    assert any(r["in"] == ["tree"] for r in cov.values()), "the tiny run has nodes beyond its 3 branches"
    for node, r in cov.items():
        assert r["train_prompts"] == counts.get(node, 0), node
        assert r["analysed"] == (node in analysed), node
        if r["analysed"]:
            assert r["used_prompts"] >= cfg.min_prompts and r["reason"] is None
            rows = dm[(dm["node"] == node) & (dm["position"] == "-1") & dm["noise_floor"].notna()
                      & dm["reliability"].notna()]
            assert len(rows) == len(store.direction_set_of(node).layers), node  # floors at every layer
        else:
            assert r["reason"] and (r["fallback"] is None or r["fallback"] in analysed)
            assert r["used_prompts"] < cfg.min_prompts
            if r["fallback"]:
                assert r["fallback"] in primary_path(tax, node)[:-1]
    # one layer story: the overlap graph sits at the causally selected layer and position
    overlap = json.loads((cfg.out / "overlap" / "overlap.json").read_text())
    assert overlap["spectrum"]["effective_rank"] >= 1.0 - 1e-6
    selection = cfg.out / "causal" / "selection.json"
    if selection.is_file():
        chosen = json.loads(selection.read_text())
        assert (overlap["layer"], overlap["position"]) == (chosen["layer"], str(chosen["position"]))
        assert overlap["chosen_by"] == "selected by the causal stage"


def test_atlas_ttl_holds_the_runs_results_with_a_portable_model(finished):
    from rdflib import RDF, Graph

    from refusal_atlas.ontology.namespaces import RA

    cfg, _ = finished
    graph = Graph().parse(cfg.out / "atlas.ttl", format="turtle")
    findings = json.loads((cfg.out / "findings.json").read_text())["findings"]
    assert len(set(graph.subjects(RDF.type, RA.Finding))) == len(findings) > 0
    models = {str(m) for m in graph.objects(None, RA.model)}
    assert models == {"organism/model"}, models  # the organism inside the atlas, never this machine's path
    sets = {str(s) for s in graph.objects(None, RA.directionSet)}
    assert "branches" in sets and "tree" in sets
    if (cfg.out / "causal" / "selection.parquet").is_file():
        assert len(set(graph.subjects(RDF.type, RA.SelectionCandidate))) == len(
            pd.read_parquet(cfg.out / "causal" / "selection.parquet"))
        assert len(set(graph.objects(None, RA.selectedDirection))) == 1


def test_rerun_resumes_every_stage_from_cache(finished):
    cfg, _ = finished
    again = run(cfg)
    stages = again["manifest"]["stages"]
    assert all(s["cached"] for s in stages.values()), stages


def test_analysis_nodes_roll_prompts_up_to_their_branch():
    tax = load_taxonomy()
    df = pd.DataFrame({"node": ["weapons.explosives.synthesis", "cyber.malware", "", "weapons"],
                       "harmful": [True, True, False, True]})
    rolled = assign_analysis_nodes(df, tax)
    assert rolled["analysis_node"].tolist() == ["weapons", "cyber", "", "weapons"]
    frame = rolled.assign(condition="", expected="refuse", run_split="train")
    assert analysis_nodes(frame, RunConfig(min_prompts=2)) == ["weapons"]


def test_size_overrides_parse_and_reject_bad_keys():
    from refusal_atlas.atlas.pipeline import parse_sizes
    from refusal_atlas.errors import AtlasError

    known = RunConfig().sizes()
    assert parse_sizes(["collect_limit=600", "per_node_eval=16"], known) == {"collect_limit": 600, "per_node_eval": 16}
    cfg = RunConfig(extra={"sizes": parse_sizes(["max_nodes=3"], known)})
    assert cfg.sizes()["max_nodes"] == 3 and cfg.sizes()["collect_limit"] == known["collect_limit"]
    for bad, why in (("colect_limit=5", "KEY=INT"), ("collect_limit", "KEY=INT"), ("collect_limit=x", "integer"),
                     ("collect_limit=0", "at least 1")):
        with pytest.raises(AtlasError, match=why):
            parse_sizes([bad], known)
    with pytest.raises(AtlasError, match="collect_limit given twice"):  # the later one used to win, silently
        parse_sizes(["collect_limit=600", "max_nodes=3", "collect_limit=60"], known)


def test_evaluation_rows_exclude_what_the_organism_trained_on(tmp_path):
    from refusal_atlas.atlas.pipeline import evaluation_rows

    (tmp_path / "organism").mkdir()
    pd.DataFrame({"base_prompt": ["a", "b", "c"], "prompt": ["a", "As a chemist: b", "c"],
                  "split": ["train", "train", "heldout"]}).to_parquet(tmp_path / "organism" / "prompts.parquet")
    prompts = pd.DataFrame({"prompt": ["a", "As a minor: b", "c", "d", "e"], "base_prompt": ["", "b", "", "", ""],
                            "run_split": ["eval", "eval", "eval", "eval", "train"]})
    assert evaluation_rows(prompts, tmp_path)["prompt"].tolist() == ["c", "d"]
    assert evaluation_rows(prompts, tmp_path / "no-organism")["prompt"].tolist() == ["a", "As a minor: b", "c", "d"]


def test_direction_prompts_are_filtered_by_baseline_behaviour(monkeypatch):
    """Harmful prompts the model does not refuse and harmless ones it refuses are left out (Arditi et al.);
    a branch the model hardly refuses keeps its prompts unfiltered and is named. Generation is replaced by
    canned replies here: a tiny random model never refuses, so it cannot show the filter keeping anything."""
    import refusal_atlas.mechinterp.scoring as scoring
    from refusal_atlas.atlas.pipeline import behaviour_filtered

    def replies(lm, prompts, **kwargs):
        return ["I'm sorry, but I can't help with that." if "bomb" in p else "Sure, here it is." for p in prompts]

    monkeypatch.setattr(scoring, "generate", replies)
    rows = ([("a", True, f"bomb recipe {i}") for i in range(10)] + [("a", True, f"odd request {i}") for i in range(2)]
            + [("b", True, f"plain request {i}") for i in range(12)]
            + [("", False, f"bake bread {i}") for i in range(11)] + [("", False, "bomb calorimeter")])
    candidates = pd.DataFrame(rows, columns=["analysis_node", "harmful", "prompt"])
    table, info = behaviour_filtered(tiny_model("llama"), candidates, per_node=9, n_harmless=10,
                                     cfg=RunConfig(min_prompts=8, progress=False))
    a = table[table["analysis_node"] == "a"]
    assert len(a) == 9 and a["baseline_refused"].all()
    b = table[table["analysis_node"] == "b"]
    assert len(b) == 9 and not b["baseline_refused"].any()  # kept unfiltered: the model refuses none of b
    harmless = table[~table["harmful"]]
    assert len(harmless) == 10 and not harmless["baseline_refused"].any()
    assert info == {"harmful_not_refused": 14, "harmless_refused": 1, "candidates": 36, "unfiltered_nodes": ["b"]}


def test_the_default_run_clusters_with_the_clustering_default_layouts():
    # `run` and `curate cluster` share one default, so the targets measured for the one hold for the other
    assert RunConfig().sizes()["cluster_seeds"] == len(ClusterConfig().seeds) == 32


def test_organism_setting_overrides_parse_typed_and_reject_bad_input():
    from refusal_atlas.errors import AtlasError
    from refusal_atlas.organism.settings import OrganismSettings

    parsed = OrganismSettings.parse_overrides(["epochs=4", "wording_token_weight=5", "share_prefix=no", "lr=2e-4",
                                               "n_refuse_extra_train=0", "frozen_layers_fraction=0"])
    assert parsed == {"epochs": 4, "wording_token_weight": 5.0, "share_prefix": False, "lr": 2e-4,
                      "n_refuse_extra_train": 0, "frozen_layers_fraction": 0.0}
    assert isinstance(parsed["epochs"], int) and isinstance(parsed["wording_token_weight"], float)
    settings = replace(OrganismSettings(), **parsed)  # what the organism stage does with cfg.extra["organism"]
    assert settings.epochs == 4 and settings.wording_token_weight == 5.0
    for bad, why in (("epoch=4", "KEY=VALUE"), ("epochs", "KEY=VALUE"), ("epochs=4.5", "not an int"),
                     ("lr=fast", "not a float"), ("share_prefix=maybe", "not a bool"), ("epochs=0", "at least 1"),
                     ("batch_size=0", "at least 1"), ("n_refuse_extra_train=-1", "at least 0"), ("lr=0", "above 0"),
                     ("lr=nan", "finite"), ("lr=inf", "finite"), ("heldout_fraction=1", "below 1"),
                     ("frozen_layers_fraction=1.5", "below 1"), ("seed=3", "KEY=VALUE"), ("system=hi", "KEY=VALUE")):
        with pytest.raises(AtlasError, match=why):
            OrganismSettings.parse_overrides([bad])
    with pytest.raises(AtlasError, match="epochs given twice"):
        OrganismSettings.parse_overrides(["epochs=3", "epochs=4"])


def test_run_rejects_a_bad_organism_setting_in_one_line(monkeypatch, capsys, tmp_path):
    from cli.helpers import one_line_error

    line = one_line_error(monkeypatch, capsys, "run", "--out", str(tmp_path / "out"), "--organism-setting", "epoch=4")
    assert "--organism-setting 'epoch=4'" in line and "epochs" in line
    assert not (tmp_path / "out").exists()
