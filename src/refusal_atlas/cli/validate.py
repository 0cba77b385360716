"""CLI: `refusal-atlas validate` — the verdict rules on three models whose answer is known.

Builds the shared and the separable organism, runs the atlas on each and on the base model, decides
every question, and compares each verdict with the planted answer (`atlas.verdict_validation`).
Writes DIR/validation.json, DIR/validation.md (the README table) and one atlas folder per model.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import typer

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.pipeline import RunConfig, build_pipeline
from refusal_atlas.atlas.verdict_figures import read_figures
from refusal_atlas.atlas.verdict_validation import (
    Check,
    check_base,
    check_sae,
    check_separable,
    check_shared,
    markdown_table,
    summary,
)
from refusal_atlas.atlas.verdicts import decide
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write_json, atomic_write_text
from refusal_atlas.lm.models import auto_threads
from refusal_atlas.mechinterp.harm_refusal_known import known_answer_checks
from refusal_atlas.organism.separable import SeparableSettings, build_separable
from refusal_atlas.terminal import safe_console

BUDGETS = ("full", "reduced")
MODELS = ("shared", "separable", "base")
# Every atlas measures only what the validated rules read (pooled layer by every-layer ablation, no dose,
# cross-ablation, components, band and restoration scans): the full causal stage does not fit the 40 minutes.
LEAN = MODELS
# the model each atlas's restoration scan restores blocks to: the base both organisms were built from
REFERENCE = {"shared": None, "separable": "default", "base": None}
# the stages whose files a verdict reads; collection, detection, clustering, harm and the report are skipped
VERDICT_STAGES = ("taxonomy", "prompts", "organism", "directions", "overlap", "causal")
# the atlases that also run the SAE stage, for its known answer (the planted pair's feature sets)
SAE_MODELS = ("shared", "separable")
# Per-organism budgets, smaller than the default run's where no verdict needs the size and larger where one
# does: at 6 evaluation prompts per node a cross-removal fraction's interval spans most of [0, 1], so the rules
# could only answer "inconclusive". Stability and cone ablations describe the headline, which no verdict reads.
# 4 branches (the run's largest; with the default data they include both of the separable organism's planted
# branches, which are chosen the same way) instead of 6: the cross-ablation grows with the square of the count.
SIZES = {"full": {"per_node_eval": 16, "per_node_train": 16, "harmless_train": 48, "condition_per_node": 16,
                  "robustness_checks": 0, "max_nodes": 4},
         # the reduced smoke test keeps 16 evaluation prompts per branch: at 10 the base model's 3 of 10 hate prompts
         # opening with "I" leave an upper bound of 0.60, and "no refusal to analyse" cannot be told (measured)
         "reduced": {"per_node_eval": 16, "robustness_checks": 0, "max_nodes": 4}}


def register(app: typer.Typer) -> None:
    """Attach `validate` to the main app."""
    app.command("validate")(validate)


def validate(
    out: Path = typer.Option(..., "-o", "--out", help="output folder (organisms/, atlas-*/, validation.json, .md)"),
    budget: str = typer.Option("full", "--budget", help="'full' (<= 40 min on 2 cores) or 'reduced' (a smoke test)"),
    seed: int = typer.Option(0, "--seed", help="seed for every build and run"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: auto by load)"),
    only: str | None = typer.Option(None, "--only", help="run one model's atlas (shared, separable or base) and "
                                    "stop: several processes can share the work; a later run without --only "
                                    "reuses their stages and checks"),
) -> None:
    """Check every verdict rule against planted answers: base model, shared organism, separable organism."""
    if budget not in BUDGETS:
        raise AtlasError(f"--budget {budget!r}: use one of {', '.join(BUDGETS)}")
    if only is not None and only not in MODELS:
        raise AtlasError(f"--only {only!r}: use one of {', '.join(MODELS)}")
    console = safe_console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    result = run_validation(out, reduced=budget == "reduced", seed=seed, threads=threads, console=console,
                            only=only)
    if only is not None:
        typer.echo(f"{out / f'atlas-{only}'}: done; run `refusal-atlas validate -o {out}` to check every model")
        return
    atomic_write_json(out / "validation.json", result)

    checks = [Check(**c) for c in result["checks"]]
    m, load = result["machine"], result["load_average"]
    peak = max(v[0] for v in load.values())
    head = (f"`refusal-atlas validate --budget {result['budget']} --seed {seed}`: {len(checks)} planted answers, "
            f"{sum(c.agrees for c in checks)} agree; {result['seconds']:.0f} s on {m['cpus']} CPU cores "
            f"({m['torch_threads']} torch threads), 1-minute load average {load['start'][0]:.1f} at the start and "
            f"up to {peak:.1f} between phases; phases: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in result["stage_seconds"].items()) + ".\n\n")
    atomic_write_text(out / "validation.md", head + markdown_table(checks))
    s = result["summary"]
    for model, m in s["per_model"].items():
        typer.echo(f"{model}: {m['agree']} of {m['checks']} planted answers agree")
    typer.echo(f"trusted rules: {', '.join(s['trusted_rules']) or 'none'}; all agree: {s['all_agree']}")
    typer.echo(f"-> {out / 'validation.json'}, {out / 'validation.md'} ({result['seconds']:.0f} s)")


def run_validation(out: Path, *, reduced: bool, seed: int, threads: int | None, console: Any,
                   only: str | None = None) -> dict[str, Any]:
    """Build, run and check; returns the content of validation.json (with `only`: that model's atlas, no checks)."""
    start = time.perf_counter()
    torch.set_num_threads(threads or auto_threads())
    times: dict[str, float] = {}
    stages: dict[str, dict[str, Any]] = {}
    loads: dict[str, tuple[float, float, float]] = {"start": os.getloadavg()}

    t = time.perf_counter()
    sep = build_separable(None, "default", seed=seed, out_dir=out / "organisms" / "separable",
                          separable=SeparableSettings(), threads=threads)
    times["build separable"] = time.perf_counter() - t
    loads["after build separable"] = os.getloadavg()

    def atlas(name: str, model: str, organism: bool, trained_on: Path | None = None) -> list:
        t0 = time.perf_counter()
        folder = out / f"atlas-{name}"
        if trained_on is not None:
            # where `run` looks for what the organism was trained on, so those prompts are never evaluated on
            (folder / "organism").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trained_on, folder / "organism" / "prompts.parquet")
        # the shared organism is the one `run` builds for `default`: the same recipe and stage
        # the shared organism's reference is its own base (RunConfig.reference_model); the base model has none
        cfg = RunConfig(model=model, organism=organism, out=folder, quick=reduced, seed=seed, threads=threads,
                        reference=REFERENCE[name])
        cfg.extra["sizes"] = dict(SIZES["reduced" if reduced else "full"])
        pipe = build_pipeline(cfg, console)
        for stage in pipe.stages:
            stage.enabled = stage.enabled and (stage.name in VERDICT_STAGES or
                                               (stage.name == "sae" and name in SAE_MODELS))
            if stage.name == "causal" and name in LEAN:  # a causal parameter only: the stages before keep their key
                stage.params = {**stage.params, "verdict_evidence_only": True}
        records = pipe.run()
        findings = decide(read_figures(folder))
        atomic_write_json(folder / "findings.json", {"findings": [f.to_dict() for f in findings]})
        times[f"atlas {name}"] = time.perf_counter() - t0
        stages[name] = {n: {"seconds": round(r.seconds, 1), "cached": r.cached} for n, r in records.items()}
        loads[f"after atlas {name}"] = os.getloadavg()
        return findings

    runs = {"shared": lambda: atlas("shared", "default", True),
            "separable": lambda: atlas("separable", str(sep.model_dir), False, sep.out_dir / "prompts.parquet"),
            "base": lambda: atlas("base", "default", False)}
    if only is not None:
        runs[only]()
        return {}
    shared, separable, base = runs["shared"](), runs["separable"](), runs["base"]()
    truth = sep.info["truth"]
    checks = [*check_base(base), *check_shared(shared), *check_separable(separable, truth)]
    # the SAE stage's feature sets of the separable organism's planted pair, on both organisms
    a, b = sorted(truth.get("branches", {}))[:2] if len(truth.get("branches", {})) >= 2 else ("", "")
    for name, overlap in (("shared", True), ("separable", False)):
        jaccard = out / f"atlas-{name}" / schema.SAE_JACCARD.path
        checks.append(check_sae(name, pd.read_parquet(jaccard) if jaccard.is_file() else None, a, b, overlap=overlap))
    # the harmfulness-vs-refusal rule is checked on a tiny model with planted directions (seconds, no organism)
    checks += [Check(**c) for c in known_answer_checks()]
    return {"budget": "reduced" if reduced else "full", "seed": seed,
            "planted": {"base": "never refuses", "shared": "one refusal decision for every branch",
                        "separable": truth},
            "checks": [c.to_dict() for c in checks], "summary": summary(checks),
            "findings": {"base": [f.to_dict() for f in base], "shared": [f.to_dict() for f in shared],
                         "separable": [f.to_dict() for f in separable]},
            "stage_seconds": {k: round(v, 1) for k, v in times.items()}, "atlas_stages": stages,
            "sizes": SIZES["reduced" if reduced else "full"], "verdict_evidence_only": list(LEAN),
            "stages_run": list(VERDICT_STAGES), "sae_stage_run": list(SAE_MODELS),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "torch_threads": torch.get_num_threads()},
            "load_average": {k: [round(x, 2) for x in v] for k, v in loads.items()},
            "seconds": time.perf_counter() - start}


