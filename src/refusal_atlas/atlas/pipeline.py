"""`refusal-atlas run`: every stage from the taxonomy to the report, cached and resumable.

taxonomy → ontology (taxonomy.ttl) → prompts → organism (default model only) → collect → detect
→ cluster + map → directions (capture + diff-in-means + noise floors) → tree (every node with enough
prompts) → causal tests → overlap (at the selected layer) → sae → harm → verdicts
→ atlas (atlas.ttl, report.html, manifest.json, metrics.json).

Each stage writes its files into the output folder and a record under `.stages/`; a rerun with
unchanged inputs skips it (see `stages.py`). `quick=True` shrinks every stage for CI.

Analysis nodes: the external prompt sets map to coarse taxonomy nodes through the crosswalks, and
the taxonomy examples give a few prompts to each leaf. A direction needs enough prompts for a
meaningful noise floor, so each harmful prompt is rolled up to its *branch* (the root of its
node) and branches with at least `min_prompts` training prompts get directions.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from refusal_atlas.atlas import pipeline_causal, pipeline_cluster, schema, wording_stage
from refusal_atlas.atlas.harm_stage import HARM_VERSION
from refusal_atlas.atlas.links import write_atlas_ttl
from refusal_atlas.atlas.pipeline_causal import PROTOCOL_VERSION
from refusal_atlas.atlas.pipeline_findings import shipped_validation, stage_harm, stage_verdicts
from refusal_atlas.atlas.pipeline_sae import sae_params, stage_sae
from refusal_atlas.atlas.report import build_report
from refusal_atlas.atlas.runconfig import (
    DEFAULT_OUT,
    RunConfig,
    evaluation_rows,
    model_prompts,
    organism_trained,
    parse_sizes,
    run_taxonomy,
)
from refusal_atlas.atlas.sae_stage import sae_metrics
from refusal_atlas.atlas.stages import Pipeline, Stage, StageContext, stable_hash, write_json_atomic
from refusal_atlas.atlas.tree_stage import stage_tree
from refusal_atlas.curation.backends import GenerationSettings, TransformersBackend
from refusal_atlas.curation.collect import collect
from refusal_atlas.curation.detect import DEFAULT_DETECTOR, evaluate_detectors, get_detector
from refusal_atlas.curation.prompts import build_prompt_set
from refusal_atlas.curation.tables import write_rejects, write_table
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256, text_sha256
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.models import LoadedModel, auto_threads, load_model
from refusal_atlas.lm.positions import Position, parse_position_label
from refusal_atlas.mechinterp.causal.files import DIRECTION_PROMPTS, SELECTION_JSON
from refusal_atlas.mechinterp.causal.files import write_table as write_causal_table
from refusal_atlas.mechinterp.directions import DirectionSet
from refusal_atlas.mechinterp.extract import extract_directions
from refusal_atlas.mechinterp.harm_refusal_verdict import RULE_NAME as HARM_RULE
from refusal_atlas.mechinterp.overlap import write_overlap
from refusal_atlas.mechinterp.request_form import request_forms
from refusal_atlas.mechinterp.scoring import behaves_as_labelled, behaviour_mask
from refusal_atlas.ontology.export import build_graph
from refusal_atlas.ontology.io import write_graph
from refusal_atlas.ontology.shacl import validate_graph
from refusal_atlas.organism.core import MODEL_DIR, RECIPE_VERSION, OrganismSettings, build_organism
from refusal_atlas.taxonomy.crosswalk import crosswalk_dir_for, load_crosswalks
from refusal_atlas.taxonomy.loader import taxonomy_hash
from refusal_atlas.taxonomy.model import Taxonomy
from refusal_atlas.taxonomy.resolve import contextual_nodes
from refusal_atlas.terminal import safe_console

__all__ = [
    "DEFAULT_OUT",
    "RunConfig",
    "analysis_nodes",
    "assign_analysis_nodes",
    "assign_splits",
    "behaviour_filtered",
    "build_pipeline",
    "collect_metrics",
    "evaluation_rows",
    "headline_table",
    "model_prompts",
    "organism_trained",
    "parse_sizes",
    "run",
]


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def stage_taxonomy(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    tax = run_taxonomy(cfg)
    depth = max(tax.depth(n.id) for n in tax)
    return {"nodes": len(tax), "accepted": len(tax.active()), "roots": len(tax.roots()), "depth": depth,
            "rules": sum(len(n.conditions) for n in tax), "contextual": len(contextual_nodes(tax))}


def stage_ontology(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    graph = build_graph(cfg.taxonomy)
    write_graph(graph, ctx.out / schema.TAXONOMY_TTL.path, "turtle")
    problems = validate_graph(graph)
    if problems:
        raise AtlasError(f"{ctx.out / schema.TAXONOMY_TTL.path}: {len(problems)} SHACL violation(s), "
                         f"first: {problems[0]}")
    return {"triples": len(graph), "shacl_violations": 0}


def stage_prompts(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    rejects: list[dict] = []
    # a --taxonomy DIR maps external sets through its own crosswalks (DIR/crosswalks/), never the shipped ones
    folder = crosswalk_dir_for(cfg.taxonomy)
    df = build_prompt_set(list(cfg.sets), taxonomy=run_taxonomy(cfg), conditions=True, seed=cfg.seed,
                          framings_per_value=1, rejects=rejects,
                          crosswalks=load_crosswalks(folder) if folder is not None else [])
    df = assign_analysis_nodes(df, run_taxonomy(cfg))
    df = assign_splits(df, cfg)
    write_table(df, ctx.out / schema.PROMPTS.path)
    write_rejects(ctx.out / schema.PROMPTS.path, rejects)
    counts = df[df["harmful"] & (df["condition"] == "")]["analysis_node"].value_counts()
    return {"rows": len(df), "harmful": int(df["harmful"].sum()), "conditioned": int((df["condition"] != "").sum()),
            "rejected": len(rejects), "per_branch": {k: int(v) for k, v in counts.items()}}


def assign_analysis_nodes(df: pd.DataFrame, tax: Taxonomy) -> pd.DataFrame:
    """`analysis_node`: the branch (root) of each harmful prompt's node; "" for harmless prompts."""
    def branch(node: str) -> str:
        if not node or node not in tax.nodes:
            return ""
        return str(tax.branch_of(node))

    df = df.copy()
    df["analysis_node"] = [branch(str(n)) if h else "" for n, h in zip(df["node"], df["harmful"], strict=True)]
    return df


def assign_splits(df: pd.DataFrame, cfg: RunConfig) -> pd.DataFrame:
    """A seeded train / eval split by base prompt, so a prompt and its condition variants stay together."""
    def bucket(base: str) -> str:
        h = int(text_sha256(f"{cfg.seed}:{base}")[:8], 16)
        return "eval" if h % 3 == 0 else "train"

    df = df.copy()
    base = df["base_prompt"].where(df["base_prompt"].astype(str) != "", df["prompt"])
    df["run_split"] = [bucket(str(b)) for b in base]
    return df


def analysis_nodes(prompts: pd.DataFrame, cfg: RunConfig) -> list[str]:
    """Branches with enough refused-by-policy training prompts, largest first."""
    sizes = cfg.sizes()
    h = prompts[prompts["harmful"] & (prompts["condition"] == "") & (prompts["expected"] == "refuse")
                & (prompts["run_split"] == "train") & (prompts["analysis_node"] != "")]
    counts = h["analysis_node"].value_counts()
    nodes = [n for n, c in counts.items() if c >= cfg.min_prompts]
    return sorted(nodes[: sizes["max_nodes"]])


def stage_organism(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    settings = OrganismSettings.quick() if cfg.quick else OrganismSettings()
    if cfg.extra.get("organism"):
        settings = replace(settings, **cfg.extra["organism"])
    result = build_organism(run_taxonomy(cfg), base=cfg.model, seed=cfg.seed, out_dir=ctx.out / schema.ORGANISM_DIR,
                            settings=settings, progress=cfg.progress, threads=set_threads(cfg))
    m = result.metrics
    return {"model_dir": str(result.model_dir), "seconds": result.seconds,
            "heldout_refusal_rate": m.get("heldout_refusal_rate"),
            "harmless_refusal_rate": m.get("harmless_refusal_rate"),
            "permitted_compliance_rate": m.get("permitted_compliance_rate"),
            "restricted_refusal_rate": m.get("restricted_refusal_rate"), "metrics": m}


def analysed_model_spec(cfg: RunConfig, ctx: StageContext) -> str:
    """The organism inside this run's output folder (not the path its stage recorded: that one is relative to
    the directory the run started in, so a moved folder or another working directory would miss it)."""
    if cfg.build_organism:
        return str(ctx.out / schema.ORGANISM_DIR / MODEL_DIR)
    return cfg.model


_MODEL_CACHE: dict[str, LoadedModel] = {}


def set_threads(cfg: RunConfig) -> int:
    """Set torch's CPU threads before a model stage (see `auto_threads`: a busy machine gets fewer)."""
    threads = cfg.threads or auto_threads()
    torch.set_num_threads(threads)
    return threads


def load_analysed_model(cfg: RunConfig, ctx: StageContext) -> LoadedModel:
    """Load the analysed model once per process (several stages use it)."""
    set_threads(cfg)
    spec = analysed_model_spec(cfg, ctx)
    if spec not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[spec] = load_model(spec)
    return _MODEL_CACHE[spec]


def collection_rows(prompts: pd.DataFrame, cfg: RunConfig, out: Path | None = None) -> pd.DataFrame:
    """Eval-split prompts for collection: harmful (plain + conditioned), harmless and over-refusal probes."""
    limit = cfg.sizes()["collect_limit"]
    ev = evaluation_rows(prompts, out) if out is not None else prompts[prompts["run_split"] == "eval"]
    harmful = ev[ev["harmful"] & (ev["condition"] == "")]
    conditioned = ev[ev["harmful"] & (ev["condition"] != "")]
    harmless = ev[~ev["harmful"] & (ev["source"] == "harmless")]
    over = ev[ev["source"] == "overrefusal"]
    share = {"harmful": 0.45, "conditioned": 0.25, "harmless": 0.2, "over": 0.1}
    parts = []
    for name, frame in (("harmful", harmful), ("conditioned", conditioned), ("harmless", harmless), ("over", over)):
        n = min(len(frame), int(limit * share[name]))
        parts.append(frame.sample(n=n, random_state=cfg.seed) if n < len(frame) else frame)
    return pd.concat(parts, ignore_index=True)


def stage_collect(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    prompts = model_prompts(ctx.out, cfg)
    rows = collection_rows(prompts, cfg, ctx.out)
    lm = load_analysed_model(cfg, ctx)
    settings = GenerationSettings(max_new_tokens=cfg.sizes()["max_new_tokens"], batch_size=cfg.batch_size,
                                  seed=cfg.seed)
    backend = TransformersBackend(lm, progress=cfg.progress)
    try:  # a killed run with the same settings resumes; one left by another model or settings is discarded
        corpus = collect(rows, backend, ctx.out / schema.RESPONSES.path, settings=settings)
    except AtlasError as exc:
        if not any(s in str(exc) for s in ("different model or settings", "another model or settings")):
            raise
        ctx.console.print("[yellow]discarding responses collected with another model or settings[/yellow]")
        corpus = collect(rows, backend, ctx.out / schema.RESPONSES.path, settings=settings, overwrite=True)
    return {"rows": len(corpus)}


def stage_detect(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    corpus = pd.read_parquet(ctx.out / schema.RESPONSES.path)
    detector = get_detector(DEFAULT_DETECTOR)
    refused, scores = detector.predict(corpus["response"].astype(str).tolist(), corpus["prompt"].astype(str).tolist())
    corpus["refused"] = refused
    corpus["refusal_score"] = scores
    corpus["detector"] = DEFAULT_DETECTOR
    write_table(corpus, ctx.out / schema.CORPUS.path)
    evaluation = evaluate_detectors()
    by_expected = corpus.groupby("expected")["refused"].mean().round(4).to_dict()
    return {"detector": DEFAULT_DETECTOR, "f1": evaluation[DEFAULT_DETECTOR]["f1"], "evaluation": evaluation,
            "refusal_rate_by_expected": by_expected, "refused": int(corpus["refused"].sum()), "rows": len(corpus)}


def stage_cluster(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return pipeline_cluster.run(ctx.out, cfg.seed, cfg.sizes()["cluster_seeds"], run_taxonomy(cfg))


def stage_wording(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return wording_stage.run(ctx.out, load_analysed_model(cfg, ctx), seed=cfg.seed,
                             n_seeds=cfg.sizes()["cluster_seeds"], max_new_tokens=cfg.sizes()["max_new_tokens"],
                             batch_size=cfg.batch_size, progress=cfg.progress)


def behaviour_filtered(lm: LoadedModel, candidates: pd.DataFrame, per_node: int, n_harmless: int, cfg: RunConfig
                       ) -> tuple[pd.DataFrame, dict]:
    """The direction prompts, filtered by baseline behaviour as Arditi et al. do: harmful prompts the model
    refuses, harmless ones it answers (`baseline_refused` records what it did); a branch the model refuses
    too rarely to keep `min_prompts` keeps its prompts and is listed (`behaviour_mask`). Then each branch's
    first `per_node` and the first `n_harmless` harmless prompts."""

    harm = candidates["harmful"].astype(bool)
    behaves, refused = behaves_as_labelled(lm, candidates["prompt"].tolist(), harm.tolist(), max_new_tokens=8,
                                           batch_size=cfg.batch_size, progress=cfg.progress)
    groups = candidates["analysis_node"].where(harm, "")  # harmless prompts form one group
    keep, whole = behaviour_mask(behaves.tolist(), groups.tolist(), cfg.min_prompts)
    kept = candidates.assign(baseline_refused=refused)[keep]
    parts = [rows.head(per_node) for _, rows in kept[kept["harmful"]].groupby("analysis_node", sort=True)]
    table = pd.concat([*parts, kept[~kept["harmful"]].head(n_harmless)], ignore_index=True)
    return table, {"harmful_not_refused": int((harm & ~refused).sum()),
                   "harmless_refused": int((~harm & refused).sum()),
                   "candidates": len(candidates), "unfiltered_nodes": [g for g in whole if g]}


def stage_directions(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    sizes = cfg.sizes()
    prompts = model_prompts(ctx.out, cfg)
    nodes = analysis_nodes(prompts, cfg)
    if len(nodes) < 2:
        raise AtlasError(f"only {len(nodes)} taxonomy branch(es) have ≥ {cfg.min_prompts} refused-by-policy prompts; "
                         "lower --min-prompts or add prompt sets")
    train = prompts[prompts["run_split"] == "train"]
    harmful = train[train["harmful"] & (train["condition"] == "") & (train["expected"] == "refuse")
                    & train["analysis_node"].isin(nodes)]
    per_node, n_harmless = sizes["per_node_train"], sizes["harmless_train"]
    spare = max(2, per_node // 4)  # candidates beyond the quota, to make up for prompts the filter drops
    harmful = harmful.sample(frac=1.0, random_state=cfg.seed).groupby("analysis_node").head(per_node + spare)
    harmless = train[~train["harmful"] & (train["source"] == "harmless")]
    harmless = harmless.sample(n=min(len(harmless), n_harmless + spare), random_state=cfg.seed)
    lm = load_analysed_model(cfg, ctx)
    table, filtering = behaviour_filtered(lm, pd.concat([harmful, harmless], ignore_index=True), per_node,
                                          n_harmless, cfg)
    # One shard folder per (model, prompt list): a killed capture resumes, a changed one starts afresh.
    acts_dir = ctx.out / schema.ACTIVATIONS_DIR / stable_hash([lm.provenance(), table["prompt"].tolist()])[:16]
    acts = capture_activations(lm, table["prompt"].tolist(), layers=None, positions=None, batch_size=32,
                               out_dir=acts_dir, progress=cfg.progress)
    tax = run_taxonomy(cfg)
    parents = {n: list(tax[n].broader) for n in nodes}
    labels = {n: tax[n].label for n in nodes}
    # the harmless baseline is matched on request form (question / instruction / first person): the harmful and
    # harmless sets differ in it, and an unmatched difference of means encodes that too (request_form.py)
    table = table.assign(request_form=request_forms(table["prompt"]))
    ds = extract_directions(acts, table["analysis_node"].tolist(), table["harmful"].astype(bool).tolist(),
                            seed=cfg.seed, parents=parents, labels=labels, n_model_layers=lm.n_layers,
                            n_splits=30 if cfg.quick else 50, n_boot=100 if cfg.quick else 200,
                            strata=table["request_form"].tolist())
    ds.meta["model"] = lm.provenance()
    ds.save(ctx.out / schema.DIRECTIONS_DIR)
    write_causal_table(table[list(DIRECTION_PROMPTS.columns)], ctx.out / schema.DIRECTIONS_DIR, DIRECTION_PROMPTS)
    floors = []
    for node in nodes:
        for layer in ds.layers:
            r = ds.reliability(node, layer, -1)
            if r is not None and not np.isnan(r):
                floors.append(r)
    return {"nodes": nodes, "n_prompts": len(table), "layers": len(ds.layers), "activations": str(acts_dir),
            "behaviour_filter": filtering,
            "median_noise_floor": float(np.median(floors)) if floors else None}


def stage_overlap(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The overlap graph at the layer and position the causal stage selected (one layer story for the whole
    atlas); without a selection (causal tests skipped), at the most reliable layer (`choose_layer`)."""
    ds = DirectionSet.load(ctx.out / schema.DIRECTIONS_DIR)
    chosen = ctx.out / schema.CAUSAL[SELECTION_JSON].path
    layer, how = None, "most reliable layer below 0.8 of the depth (no causal selection)"
    position: Position = -1
    if chosen.is_file():
        sel = json.loads(chosen.read_text(encoding="utf-8"))
        if int(sel.get("layer", -1)) in ds.layers:
            layer, how = int(sel["layer"]), "selected by the causal stage"
            position = parse_position_label(str(sel.get("position", -1)))
    report = write_overlap(ds, ctx.out / schema.OVERLAP_DIR, layer=layer, position=position, chosen_by=how)
    return {"edges": len(report.get("edges", [])), "layer": report.get("layer"), "position": report.get("position"),
            "chosen_by": how, "effective_rank": (report.get("spectrum") or {}).get("effective_rank"),
            "sibling_test": report.get("sibling_test")}


def stage_causal(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return pipeline_causal.run(cfg, ctx, load_analysed_model(cfg, ctx))


def stage_atlas(cfg: RunConfig, ctx: StageContext) -> dict[str, Any]:
    write_json_atomic(ctx.out / schema.METRICS.path, collect_metrics(ctx.results))
    write_atlas_ttl(ctx.out, taxonomy=run_taxonomy(cfg))
    report = build_report(ctx.out)
    return {"report": str(report)}


# ------------------------------------------------------------------------------------------------
# Metrics, manifest, driver
# ------------------------------------------------------------------------------------------------


def collect_metrics(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline figures (issue contract keys) from the stage records."""
    org = results.get("organism", {})
    det = results.get("detect", {})
    clu = results.get("cluster", {})
    dirs = results.get("directions", {})
    causal = results.get("causal", {})
    return {
        "organism": {k: org.get(k) for k in ("heldout_refusal_rate", "harmless_refusal_rate",
                                             "permitted_compliance_rate", "restricted_refusal_rate")},
        "detector": {"f1": det.get("f1"), "name": det.get("detector"),
                     "corpus_refusal_rate_by_expected": det.get("refusal_rate_by_expected")},
        "clusters": {**{k: clu.get(k) for k in ("seed_ari", "node_ari", "node_nmi", "n_clusters", "outlier_fraction",
                                                 "levels", "wording_ari", "wording", "tree_vs_taxonomy")},
                     "wording_taught": results.get("wording") or None},
        "directions": {"median_noise_floor": dirs.get("median_noise_floor"), "nodes": dirs.get("nodes"),
                       "nodes_with_directions": results.get("tree", {}).get("n_with_directions")},
        "ablation": causal.get("ablation", {}),
        "steering": causal.get("steering", {}),
        "cross_ablation": causal.get("cross_ablation", {}),
        "verdicts": results.get("verdicts", {}),
        "sae": sae_metrics(results.get("sae", {})),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("refusal-atlas", "torch", "transformers", "sentence-transformers", "umap-learn", "hdbscan",
                "rdflib", "pyshacl", "scikit-learn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def build_pipeline(cfg: RunConfig, console: Console | None = None) -> Pipeline:
    pipe = Pipeline(cfg.out, console=console, resume=cfg.resume)
    tax_key = taxonomy_hash(run_taxonomy(cfg))
    base = {"taxonomy": tax_key, "seed": cfg.seed, "quick": cfg.quick, "extra": cfg.extra}
    model_key: dict[str, Any] = {"model": cfg.model, "organism": cfg.build_organism}

    def add(name: str, fn: Callable[[RunConfig, StageContext], dict[str, Any]], depends: tuple[str, ...],
            outputs: tuple[str, ...], enabled: bool = True, **params: Any) -> None:
        def call(ctx: StageContext) -> dict[str, Any]:
            return fn(cfg, ctx)

        pipe.add(Stage(name, call, {**base, **params}, depends, outputs, enabled))

    out = schema.STAGE_OUTPUTS
    add("taxonomy", stage_taxonomy, (), out["taxonomy"])
    add("ontology", stage_ontology, ("taxonomy",), out["ontology"])
    add("prompts", stage_prompts, ("taxonomy",), out["prompts"], sets=list(cfg.sets))
    add("organism", stage_organism, ("taxonomy",), out["organism"], enabled=cfg.build_organism,
        recipe=RECIPE_VERSION, **model_key)
    add("collect", stage_collect, ("prompts", "organism"), out["collect"], **model_key,
        max_new_tokens=cfg.sizes()["max_new_tokens"])
    add("detect", stage_detect, ("collect",), out["detect"])
    add("cluster", stage_cluster, ("detect",), out["cluster"], version=pipeline_cluster.STAGE_VERSION)
    # the planted-wording known answer on the organism's own training refusals (only a built organism has them)
    add("wording", stage_wording, ("organism",), out["wording"], enabled=cfg.build_organism, **model_key,
        version=wording_stage.STAGE_VERSION, max_new_tokens=cfg.sizes()["max_new_tokens"],
        cluster_seeds=cfg.sizes()["cluster_seeds"])
    add("directions", stage_directions, ("prompts", "organism"), out["directions"], **model_key,
        min_prompts=cfg.min_prompts, max_nodes=cfg.max_nodes, prompt_filter="baseline behaviour",
        harmless_matched_on="request form")
    add("tree", lambda c, ctx: stage_tree(c, ctx, lambda: load_analysed_model(c, ctx)),
        ("prompts", "organism", "directions"), out["tree"], **model_key, min_prompts=cfg.min_prompts,
        tree="primary paths, every depth, diff_means, each node its own sample",
        tree_budget="2 x min_prompts per node; 30 splits, 100 resamples, floors at the role positions")
    add("causal", stage_causal, ("directions", "prompts"), out["causal"], protocol=PROTOCOL_VERSION, **model_key,
        reference=cfg.reference_model)
    # after causal: the overlap graph is drawn at the layer and position the causal stage selected
    add("overlap", stage_overlap, ("directions", "causal"), out["overlap"], at="causally selected layer")
    add("sae", lambda c, ctx: stage_sae(c, ctx, load_analysed_model(c, ctx)),
        ("causal", "collect", "directions", "prompts"), out["sae"], **sae_params(cfg), **model_key)
    add("harm", lambda c, ctx: stage_harm(c, ctx, load_analysed_model(c, ctx)), ("detect", "directions"),
        out["harm"], rule=HARM_RULE, version=HARM_VERSION, **model_key)
    # the shipped validation record decides which rules are trusted: a new record reruns the stage
    validation = shipped_validation()
    add("verdicts", stage_verdicts, ("directions", "overlap", "causal", "harm"), out["verdicts"],
        validation=file_sha256(validation) if validation is not None else None)
    add("atlas", stage_atlas, ("ontology", "detect", "cluster", "wording", "tree", "overlap", "causal", "verdicts",
                               "sae"),
        out["atlas"])
    return pipe


def run(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the metrics and writes manifest.json."""
    console = console or safe_console(stderr=True)
    start = time.perf_counter()
    pipe = build_pipeline(cfg, console)
    records = pipe.run()
    metrics = collect_metrics({n: r.result for n, r in records.items()})
    manifest = {
        "command": "refusal-atlas run",
        "parameters": {"model": cfg.model, "taxonomy": str(cfg.taxonomy) if cfg.taxonomy else "default",
                       "quick": cfg.quick, "seed": cfg.seed, "sets": list(cfg.sets), "min_prompts": cfg.min_prompts,
                       "organism": cfg.build_organism, "sizes": cfg.sizes()},
        "seeds": {"global": cfg.seed},
        "versions": versions(),
        "stages": {n: {"seconds": round(r.seconds, 2), "cached": r.cached, "key": r.key} for n, r in records.items()},
        "total_seconds": round(time.perf_counter() - start, 2),
        "config_hash": stable_hash({"model": cfg.model, "quick": cfg.quick, "seed": cfg.seed}),
    }
    write_json_atomic(cfg.out / schema.MANIFEST.path, manifest)
    write_json_atomic(cfg.out / schema.METRICS.path, metrics)
    if "atlas" in records and not records["atlas"].cached:  # the report's provenance section reads the manifest
        build_report(cfg.out)
    return {"metrics": metrics, "manifest": manifest}


def headline_table(metrics: dict[str, Any]) -> Table:
    """The contract metrics as a rich table."""
    table = Table(title="headline metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for group in ("organism", "detector", "clusters", "directions", "ablation", "steering"):
        for key, value in (metrics.get(group) or {}).items():
            if isinstance(value, float):
                table.add_row(f"{group}.{key}", f"{value:.3f}")
            elif isinstance(value, int | str) and not isinstance(value, bool):
                table.add_row(f"{group}.{key}", str(value))
    return table
