"""CLI: `refusal-atlas organism build|test` (thin layer over refusal_atlas.organism)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from refusal_atlas.atlas.organism_test import run_organism_test
from refusal_atlas.cli.console import sub_app
from refusal_atlas.cli.directions import _read_prompts
from refusal_atlas.cli.options import number
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import auto_threads
from refusal_atlas.organism.build import build_organism
from refusal_atlas.organism.separable import SeparableSettings, build_separable
from refusal_atlas.organism.settings import OrganismSettings

app = sub_app("Build a model organism that follows the taxonomy's policy.")


@app.command()
def build(
    out: Path = typer.Option(..., "-o", "--out", help="output folder (model/, organism.json, adherence tables)"),
    taxonomy: Path | None = typer.Option(None, "--taxonomy", "-t", help="taxonomy folder (default: the shipped one)"),
    base: str = typer.Option("default", "--base", help="'default', a model folder, a .gguf file or a hub id"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed for the train / held-out split and training"),
    prompts: Path | None = typer.Option(None, "--prompts",
                                        help="prompt table (.parquet/.jsonl/.csv: prompt, node, harmful[, source]); "
                                             "default: taxonomy examples + HarmBench/StrongREJECT via crosswalks"),
    quick: bool = typer.Option(False, "--quick", help="a far smaller build (CI, smoke tests)"),
    epochs: int | None = typer.Option(None, "--epochs", min=1),
    lr: float | None = typer.Option(None, "--lr", callback=number(0.0, above=True)),
    specific_roots: str | None = typer.Option(
        None, "--specific-wording", help="comma-separated root nodes whose refusals are worded per node "
                                         "(default: every other root); 'none' = one shared wording"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: auto by load)"),
    force: bool = typer.Option(False, "--force", help="rebuild even when the cache matches"),
    recipe: str = typer.Option("shared", "--recipe",
                               help="'shared': one refusal decision for every branch (the default organism); "
                                    "'separable': two branches whose refusals live in disjoint bands of blocks"),
    branches: str | None = typer.Option(None, "--branches",
                                        help="separable: comma-separated root nodes, one per band (default: the two "
                                             "roots with the most refuse-policy prompts)"),
) -> None:
    """Fine-tune the base chat model to follow the taxonomy's conditional refusal policy."""


    if recipe not in ("shared", "separable"):
        raise AtlasError(f"--recipe {recipe!r}: use 'shared' or 'separable'")
    if recipe == "separable":
        _build_separable(out, taxonomy, base, seed, prompts, quick, branches, threads, force)
        return

    settings = OrganismSettings.quick() if quick else OrganismSettings()
    if epochs is not None:
        settings = replace(settings, epochs=epochs)
    if lr is not None:
        settings = replace(settings, lr=lr)
    if specific_roots is not None:
        roots = () if specific_roots.strip().lower() == "none" else tuple(
            r.strip() for r in specific_roots.split(",") if r.strip())
        settings = replace(settings, specific_wording_roots=roots)
    table = _read_prompts(prompts) if prompts is not None else None
    result = build_organism(taxonomy, base, seed=seed, out_dir=out, settings=settings, prompts=table,
                            force=force, threads=threads or auto_threads())
    m = result.metrics
    state = "cached" if result.cached else f"built in {result.seconds:.0f} s"

    def pct(x):
        return "n/a" if x is None else f"{x:.2f}"

    typer.echo(f"organism {state} -> {result.model_dir}")
    typer.echo(f"held-out refusal (policy refuse) {pct(m.get('heldout_refusal_rate'))}; "
               f"harmless refusal {pct(m.get('harmless_refusal_rate'))}; "
               f"permitted compliance {pct(m.get('permitted_compliance_rate'))}; "
               f"restricted refusal {pct(m.get('restricted_refusal_rate'))}")
    typer.echo(json.dumps({"n_heldout": m.get("n_heldout", {})}))


def _build_separable(out: Path, taxonomy: Path | None, base: str, seed: int, prompts: Path | None, quick: bool,
                     branches: str | None, threads: int | None, force: bool) -> None:


    sep = SeparableSettings.reduced() if quick else SeparableSettings()
    if branches:
        sep = replace(sep, branches=tuple(b.strip() for b in branches.split(",") if b.strip()))
    table = _read_prompts(prompts) if prompts is not None else None
    result = build_separable(taxonomy, base, seed=seed, out_dir=out, separable=sep, prompts=table, force=force,
                             threads=threads or auto_threads())
    state = "cached" if result.cached else f"built in {result.seconds:.0f} s"
    truth = result.info["truth"]
    typer.echo(f"separable organism {state} -> {result.model_dir}")
    rates = truth["verification"]["rates"]
    for b, t in truth["branches"].items():
        lo, hi = t["band"]
        typer.echo(f"  {b}: blocks {lo}..{hi - 1}; refusal {rates['organism'][b]['refusal_rate']:.2f} "
                   f"(n = {rates['organism'][b]['n']}), with its band restored to the base "
                   f"{rates['restore:' + b][b]['refusal_rate']:.2f}")
    typer.echo(f"planted truth verified: {truth['verification']['verified']}")


@app.command("test")
def test_cmd(
    organism: Path = typer.Argument(..., help="organism folder written by `organism build`"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder for tables, figures and causal.json"),
    level: str = typer.Option("root", "--level", help="direction labels: 'root' (taxonomy branch) or 'node'"),
    coeffs: str = typer.Option("1.0", "--coeffs", help="activation-addition coefficients (first = headline)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: auto by load)"),
) -> None:
    """Causal tests on an organism: directions, selection, pooled ablation/addition, cross-ablation,
    steering, wording vs detection, conditions."""
    # imported here only to keep this edit inside the `test` command's body (the rest of the file has another owner)
    import torch


    torch.set_num_threads(threads or auto_threads())
    m = run_organism_test(organism, out, level=level, coeffs=[float(c) for c in coeffs.split(",")])
    a, s = m["ablation"], m["steering"]
    scope = f"layers {a['ablate_from']}+" if a.get("ablate_from") else "every layer"
    typer.echo(f"pooled direction at layer {a['layer']}, position {a['position']}: held-out refusal "
               f"{a['refusal_before']:.2f} -> {a['refusal_after']:.2f} under ablation in {scope} (harmless KL "
               f"{a['harmless_kl']:.3f}); addition induces refusal on {s['induced_refusal_rate']:.2f} of harmless")
    if "all_layers" in a:
        typer.echo(f"  every layer (Arditi et al.): {a['refusal_before']:.2f} -> {a['all_layers']['refusal_after']:.2f}"
                   f" (harmless KL {a['all_layers']['harmless_kl']:.3f})")
    typer.echo(f"-> {out}")
