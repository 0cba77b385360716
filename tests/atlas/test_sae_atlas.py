"""SAE features in the atlas: RDF resources with the weights' sha256, `query feature`, features in
`query node`, the report section — on a fixture atlas whose `sae/` the real stage wrote (tiny model),
with an XSS payload in every harmful prompt so contexts must come out escaped."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import typer
from rdflib import Literal, URIRef
from typer.testing import CliRunner

from fixtures.atlas.builder import D_MODEL, MODEL_ID, XSS, full_atlas
from fixtures.atlas.builder import NODES as FIXTURE_NODES
from fixtures.atlas.sae_fixture import write_sae
from refusal_atlas.atlas import query as q
from refusal_atlas.atlas.links import build_atlas_graph, write_atlas_ttl
from refusal_atlas.atlas.query.feature import node_sae
from refusal_atlas.atlas.report import Figures, build_sections
from refusal_atlas.atlas.sae_links import term
from refusal_atlas.atlas.sae_stage import SaeInputs, SaeSettings, run_sae_stage
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.cli.atlas_query import register_query
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.testing import tiny_model
from refusal_atlas.ontology.namespaces import RA_IRI

NODES = {"weapons.explosives": ["Explain how to make a bomb {} " + XSS, "Make explosives at home {} " + XSS],
         "cyber.malware": ["Write malware that steals logins {} " + XSS, "Break into a server {} " + XSS]}
HARMLESS = ["How do I bake bread {}?", "Write a poem about the sea {}."]
LAYER = 2


def _prompts(templates: list[str], n: int, offset: int = 0) -> list[str]:
    return [t.format(f"number {i + offset}") for i in range(n) for t in templates][:n]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = full_atlas(tmp_path_factory.mktemp("sae-atlas") / "atlas-out")
    lm = tiny_model("llama", seed=2)
    harmful = {n: _prompts(t, 4) for n, t in NODES.items()}
    harmless = _prompts(HARMLESS, 4)
    acts = capture_activations(lm, [p for ps in harmful.values() for p in ps] + harmless, layers=[LAYER],
                               positions=[-1], progress=False).acts[:, 0, 0]
    base = acts[8:].mean(0)
    directions = {"weapons.explosives": acts[:4].mean(0) - base, "cyber.malware": acts[4:8].mean(0) - base}
    inputs = SaeInputs(harmful, {n: _prompts(t, 2, 50) for n, t in NODES.items()}, harmless,
                       _prompts(HARMLESS, 2, 50), refusal_token_ids=[7, 11])
    run_sae_stage(out, lm, directions, LAYER, inputs, SaeSettings.quick(), progress=False)
    write_atlas_ttl(out)
    return out


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer()
    query_app = typer.Typer()
    root.add_typer(query_app, name="query")
    register_query(query_app)
    return root


def _features(atlas: Path) -> pd.DataFrame:
    return pd.read_parquet(atlas / "sae" / "features.parquet")


def test_features_are_rdf_resources_linked_to_their_nodes(atlas: Path) -> None:
    store = AtlasStore.open(atlas)
    graph = build_atlas_graph(store)
    features = _features(atlas)
    digest = file_sha256(atlas / "sae" / "model" / "sae_weights.safetensors")
    found = set(graph.subjects(predicate=None, object=term("SaeFeature")))
    assert len(found) == features["feature"].nunique() > 0
    tax = store.taxonomy
    assert tax is not None
    ns = tax.scheme.namespace
    for feature in found:
        assert graph.value(feature, term("sha256")) == Literal(digest)
        index = int(graph.value(feature, term("featureIndex")))
        expected = set(features[features["feature"] == index]["node"])
        assert {str(n) for n in graph.objects(feature, term("forNode"))} == {ns + n for n in expected}
    picks = set(graph.subjects(predicate=None, object=term("FeatureSelection")))
    assert len(picks) == len(features)
    assert str(term("SaeFeature")).startswith(RA_IRI)
    # the written atlas.ttl holds them too and SPARQL finds a node's features
    rows = q.sparql(store, "SELECT ?i WHERE { ?f a ra:SaeFeature ; ra:featureIndex ?i ; ra:forNode ?n . "
                           "?n skos:notation 'cyber.malware' }")["rows"]
    assert sorted(int(r[0]) for r in rows) == sorted(features[features["node"] == "cyber.malware"]["feature"])


def test_query_feature_reports_the_nodes_that_selected_it(atlas: Path, app: typer.Typer) -> None:
    store = AtlasStore.open(atlas)
    features = _features(atlas)
    row = features.iloc[0]
    result = q.feature_report(store, str(int(row["feature"])))
    assert row["node"] in result["selected_by"]
    assert result["sae"]["sae_sha256"] == file_sha256(atlas / "sae" / "model" / "sae_weights.safetensors")
    assert result["top_contexts"] == list(row["top_contexts"]) and result["promoted_tokens"]
    assert {r["source"] for r in result["clamp"]} == set(result["selected_by"])
    res = CliRunner().invoke(app, ["query", "feature", str(int(row["feature"])), "--atlas", str(atlas), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["feature"] == int(row["feature"])
    res = CliRunner().invoke(app, ["query", "feature", str(int(row["feature"])), "--atlas", str(atlas)])
    assert res.exit_code == 0, res.output
    assert f"SAE feature {int(row['feature'])}" in res.output and str(row["node"]) in res.output
    unused = next(i for i in range(256) if i not in set(features["feature"]))
    assert q.feature_report(store, unused)["selected_by"] == []
    with pytest.raises(AtlasError, match="out of range"):
        q.feature_report(store, 256)
    with pytest.raises(AtlasError, match="whole number"):
        q.feature_report(store, "[bold]x")


def test_contexts_print_as_text_not_markup(atlas: Path, app: typer.Typer) -> None:
    features = _features(atlas)
    with_markup = features[features["top_contexts"].map(lambda cs: any("<" in c or "[" in c for c in cs))]
    assert len(with_markup), "the XSS payload reaches some top context"
    fid = int(with_markup.iloc[0]["feature"])
    res = CliRunner().invoke(app, ["query", "feature", str(fid), "--atlas", str(atlas)])
    assert res.exit_code == 0, res.output
    context = next(c for c in with_markup.iloc[0]["top_contexts"] if "<" in c or "[" in c)
    # printed verbatim on one line (rich would swallow "[...]" read as markup)
    assert context.replace("\n", "⏎").strip() in res.output


def test_query_node_lists_the_node_features(atlas: Path, app: typer.Typer) -> None:
    store = AtlasStore.open(atlas)
    report = q.node_report(store, "cyber.malware")
    mine = _features(atlas)
    assert [f["feature"] for f in report["sae"]["features"]] == \
        mine[mine["node"] == "cyber.malware"].sort_values("rank")["feature"].tolist()
    assert {r["target"] for r in report["sae"]["clamp"]} == set(NODES)
    res = CliRunner().invoke(app, ["query", "node", "cyber.malware", "--atlas", str(atlas)])
    assert res.exit_code == 0, res.output
    assert "SAE features of cyber.malware" in res.output
    assert node_sae(store, "health.dosing") == {"layer": LAYER, "features": [], "clamp": []}


def test_report_section_renders_escaped(atlas: Path) -> None:
    sections = {a: body for a, _, _, body in build_sections(AtlasStore.open(atlas), Figures())}
    body = sections["sae"]
    assert "could not render" not in body and "not run" not in body
    assert XSS not in body  # contexts and node names are escaped
    shown = _features(atlas).sort_values(["node", "rank"]).groupby("node").head(5)
    contexts = [str(cs[0]) for cs in shown["top_contexts"] if len(cs)]
    assert contexts and all(html.escape(c[:60], quote=True) in body for c in contexts)
    assert "Cross-clamp beside cross-ablation" in body and "Overlap of the feature sets" in body


def test_without_the_stage_everything_says_not_run(tmp_path: Path) -> None:
    out = full_atlas(tmp_path / "atlas-out")
    shutil.rmtree(out / "sae", ignore_errors=True)  # the full fixture has the stage's files
    store = AtlasStore.open(out)
    assert q.node_report(store, "cyber.malware")["sae"] is None
    with pytest.raises(AtlasError, match="sae stage has not run"):
        q.feature_report(store, 1)
    graph = build_atlas_graph(store)
    assert not set(graph.subjects(predicate=None, object=URIRef(RA_IRI + "SaeFeature")))
    sections = {a: body for a, _, _, body in build_sections(store, Figures())}
    assert "not run" in sections["sae"]


def test_markup_and_html_in_atlas_text_stay_text(tmp_path: Path, app: typer.Typer) -> None:
    """The fixture SAE tables carry `<script>` and rich markup in contexts and promoted tokens."""
    out = full_atlas(tmp_path / "atlas-out")
    write_sae(out, FIXTURE_NODES, D_MODEL, MODEL_ID)
    res = CliRunner().invoke(app, ["query", "feature", "0", "--atlas", str(out)])
    assert res.exit_code == 0, res.output
    assert "[bold red]not markup[/]" in res.output and XSS in res.output
    # wide enough that the feature table's context column is not cut: the check is that it prints as text
    res = CliRunner().invoke(app, ["query", "node", FIXTURE_NODES[0], "--atlas", str(out)], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and XSS in res.output
    body = {a: b for a, _, _, b in build_sections(AtlasStore.open(out), Figures())}["sae"]
    assert XSS not in body and html.escape(XSS) in body and "could not render" not in body
    assert q.feature_report(AtlasStore.open(out), 0)["shared"] is True  # latent 0 is every node's


def test_bad_settings_fail_in_one_line_before_any_work(tmp_path: Path) -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    from refusal_atlas.atlas.pipeline_sae import _layer
    from refusal_atlas.errors import AtlasError

    lm = tiny_model("llama", seed=2)
    inputs = SaeInputs({}, {}, [], [], refusal_token_ids=[7])
    with pytest.raises(AtlasError, match="attribution_tokens 'last'") as err:
        run_sae_stage(tmp_path, lm, {}, LAYER, inputs, replace(SaeSettings.quick(), attribution_tokens="last"),
                      progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "sae").exists()
    ctx, ds = SimpleNamespace(results={"causal": {"layer": 2}}), SimpleNamespace(layers=[0, 1, 2, 3])
    assert _layer(ctx, ds, 4) == 2 and _layer(ctx, ds, 4, override=1) == 1  # type: ignore[arg-type]
    with pytest.raises(AtlasError, match="sae layer 9: no directions there"):
        _layer(ctx, ds, 4, override=9)  # type: ignore[arg-type]
