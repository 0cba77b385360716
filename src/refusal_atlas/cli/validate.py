"""CLI: `refusal-atlas validate` — the verdict rules on three models whose answer is known.

Builds the shared and the separable organism, runs the atlas on each and on the base model, decides
every question, and compares each verdict with the planted answer (`atlas.verdict_validation`).
Writes DIR/validation.json, DIR/validation.md (the README table) and one atlas folder per model.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console

from refusal_atlas.atlas.pipeline import RunConfig, run
from refusal_atlas.atlas.verdict_figures import read_figures
from refusal_atlas.atlas.verdict_validation import (
    Check,
    check_base,
    check_separable,
    check_shared,
    markdown_table,
    summary,
)
from refusal_atlas.atlas.verdicts import decide
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write_json, atomic_write_text
from refusal_atlas.lm.models import auto_threads
from refusal_atlas.organism.separable import SeparableSettings, build_separable

BUDGETS = ("full", "reduced")
EVAL_PER_NODE = {"full": 16, "reduced": 10}


def register(app: typer.Typer) -> None:
    """Attach `validate` to the main app."""
    app.command("validate")(validate)


def validate(
    out: Path = typer.Option(..., "-o", "--out", help="output folder (organisms/, atlas-*/, validation.json, .md)"),
    budget: str = typer.Option("full", "--budget", help="'full' (<= 40 min on 2 cores) or 'reduced' (a smoke test)"),
    seed: int = typer.Option(0, "--seed", help="seed for every build and run"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: auto by load)"),
) -> None:
    """Check every verdict rule against planted answers: base model, shared organism, separable organism."""


    if budget not in BUDGETS:
        raise AtlasError(f"--budget {budget!r}: use one of {', '.join(BUDGETS)}")
    console = Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    result = run_validation(out, reduced=budget == "reduced", seed=seed, threads=threads, console=console)
    atomic_write_json(out / "validation.json", result)

    checks = [Check(**c) for c in result["checks"]]
    atomic_write_text(out / "validation.md", markdown_table(checks))
    s = result["summary"]
    for model, m in s["per_model"].items():
        typer.echo(f"{model}: {m['agree']} of {m['checks']} planted answers agree")
    typer.echo(f"trusted rules: {', '.join(s['trusted_rules']) or 'none'}; all agree: {s['all_agree']}")
    typer.echo(f"-> {out / 'validation.json'}, {out / 'validation.md'} ({result['seconds']:.0f} s)")


def run_validation(out: Path, *, reduced: bool, seed: int, threads: int | None, console: Any) -> dict[str, Any]:
    """Build, run and check; returns the content of validation.json."""


    start = time.perf_counter()
    torch.set_num_threads(threads or auto_threads())
    times: dict[str, float] = {}

    t = time.perf_counter()
    sep = build_separable(None, "default", seed=seed, out_dir=out / "organisms" / "separable",
                          separable=SeparableSettings.reduced() if reduced else SeparableSettings(), threads=threads)
    times["build separable"] = time.perf_counter() - t

    def atlas(name: str, model: str, organism: bool, trained_on: Path | None = None) -> list:
        t0 = time.perf_counter()
        folder = out / f"atlas-{name}"
        if trained_on is not None:
            # where `run` looks for what the organism was trained on, so those prompts are never evaluated on
            (folder / "organism").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trained_on, folder / "organism" / "prompts.parquet")
        # the shared organism is the one `run` builds for `default`: the same recipe, cache and stage
        cfg = RunConfig(model=model, organism=organism, out=folder, quick=reduced, seed=seed, threads=threads)
        # more evaluation prompts per node than the default run's 6: at n = 6 a cross-removal fraction's interval
        # spans most of [0, 1], so the rules could only answer "inconclusive"
        cfg.extra["sizes"] = {"per_node_eval": EVAL_PER_NODE["reduced" if reduced else "full"]}
        run(cfg, console)
        findings = decide(read_figures(folder))
        atomic_write_json(folder / "findings.json", {"findings": [f.to_dict() for f in findings]})
        times[f"atlas {name}"] = time.perf_counter() - t0
        return findings

    shared = atlas("shared", "default", True)
    separable = atlas("separable", str(sep.model_dir), False, sep.out_dir / "prompts.parquet")
    base = atlas("base", "default", False)
    truth = sep.info["truth"]
    checks = [*check_base(base), *check_shared(shared), *check_separable(separable, truth)]
    return {"budget": "reduced" if reduced else "full", "seed": seed,
            "planted": {"base": "never refuses", "shared": "one refusal decision for every branch",
                        "separable": truth},
            "checks": [c.to_dict() for c in checks], "summary": summary(checks),
            "findings": {"base": [f.to_dict() for f in base], "shared": [f.to_dict() for f in shared],
                         "separable": [f.to_dict() for f in separable]},
            "stage_seconds": {k: round(v, 1) for k, v in times.items()}, "seconds": time.perf_counter() - start}


