"""CLI: `refusal-atlas directions extract | overlap | geometry` (thin layer over refusal_atlas.mechinterp)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from refusal_atlas.cli import directions_causal
from refusal_atlas.cli.console import plain_console, sub_app
from refusal_atlas.cli.directions_common import parse_bool, read_prompts
from refusal_atlas.cli.options import number
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256, text_sha256
from refusal_atlas.io import atomic_write_text
from refusal_atlas.lm.capture import capture_activations, load_shards
from refusal_atlas.lm.models import load_model
from refusal_atlas.lm.positions import Position, parse_position_label, position_label
from refusal_atlas.mechinterp.causal.files import DIRECTION_PROMPTS
from refusal_atlas.mechinterp.causal.inputs import DirectionPrompts
from refusal_atlas.mechinterp.directions import DirectionSet, Groups
from refusal_atlas.mechinterp.extract import extract_directions
from refusal_atlas.mechinterp.geometry import geometry_table, principal_angle_matrix
from refusal_atlas.mechinterp.overlap import write_overlap
from refusal_atlas.mechinterp.request_form import request_forms
from refusal_atlas.taxonomy.loader import load_taxonomy

app = sub_app("Per-node refusal directions, noise floors, geometry, overlap graph.")

# `organism build` reads its prompt table with this (one reader for every command)
_read_prompts = read_prompts


def select_rows(df, *, all_conditions: bool, known_nodes: set[str] | None, min_prompts: int = 2):
    """(kept rows as (prompt, node, harmful), rejects as dicts with row number and reason)."""
    kept, rejects = [], []
    has_condition = "condition" in df.columns
    for i, row in enumerate(df.to_dict("records")):
        prompt = row.get("prompt")
        node = row.get("node")
        node = "" if node is None or (isinstance(node, float) and node != node) else str(node)
        harmful = parse_bool(row.get("harmful"))
        condition = str(row.get("condition") or "") if has_condition else ""
        reason = None
        if not isinstance(prompt, str) or not prompt.strip():
            reason = "empty prompt"
        elif harmful is None:
            reason = f"harmful is {row.get('harmful')!r}, expected true/false"
        elif condition and not all_conditions:
            continue  # conditioned rows are a different experiment; not a reject
        elif harmful and known_nodes is not None and node and node not in known_nodes:
            reason = f"node {node!r} is not in the taxonomy"
        if reason:
            rejects.append({"row": i + 1, "prompt_id": row.get("prompt_id"), "reason": reason})
            continue
        kept.append((prompt, node if harmful else "", bool(harmful), i + 1, row.get("prompt_id")))
    counts: dict[str, int] = {}
    for _, node, harmful, *_ in kept:
        if harmful and node:
            counts[node] = counts.get(node, 0) + 1
    small = {n for n, c in counts.items() if c < min_prompts}
    final = []
    for item in kept:
        if item[2] and item[1] in small:
            rejects.append({"row": item[3], "prompt_id": item[4],
                            "reason": f"node {item[1]!r} has fewer than {min_prompts} prompts"})
        else:
            final.append(item[:3])
    return final, rejects


def _write_rejects(out: Path, rejects: list[dict[str, Any]]) -> None:
    path = out / "rejects.jsonl"
    if not rejects:
        path.unlink(missing_ok=True)
        return
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rejects))


def _load_taxonomy(path: Path | None) -> tuple[dict[str, list[str]] | None, dict[str, str] | None]:
    """(parents, labels) from the taxonomy, or (None, None) when none is available."""
    try:
        tax = load_taxonomy(path)
    except AtlasError:
        if path is not None:
            raise
        return None, None
    return ({n.id: list(n.broader) for n in tax}, {n.id: n.label for n in tax})


def _parse_layers(text: str) -> list[int] | None:
    if text.strip().lower() == "all":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AtlasError(f"--layers {text!r}: give comma-separated integers or 'all'") from None


@app.command()
def extract(
    prompts: Path = typer.Option(..., "--prompts", help="prompt table (.parquet/.jsonl/.csv): prompt, node, harmful"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder"),
    model: str = typer.Option("default", "--model", help="'default', a model folder, a .gguf file or a hub id"),
    taxonomy: Path | None = typer.Option(None, "--taxonomy", help="taxonomy folder (default: the shipped one)"),
    layers: str = typer.Option("all", "--layers", help="comma-separated block indices, or 'all'"),
    positions: str = typer.Option("eoi,last_instruction,mean_instruction", "--positions",
                                  help="comma-separated: -5..-1, eoi (all template tokens), last_instruction, "
                                       "mean_instruction"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    system: str | None = typer.Option(None, "--system", help="system prompt for the chat template"),
    all_conditions: bool = typer.Option(False, "--all-conditions", help="also use rows with a condition"),
    n_splits: int = typer.Option(50, "--splits", min=1, help="random split-halves for the noise floor"),
    n_boot: int = typer.Option(200, "--bootstrap", min=1, help="bootstrap resamples for CIs"),
    n_perm: int = typer.Option(100, "--permutations", min=0,
                               help="permutations for the cross-node cosine null (0 = skip)"),
    seed: int = typer.Option(0, "--seed", min=0),
    match_form: bool = typer.Option(True, "--match-form/--no-match-form",
                                    help="match the harmless baseline on request form (question / instruction / "
                                         "first person); unmatched, a direction also encodes how the sets differ "
                                         "in form"),
    keep_activations: bool = typer.Option(True, "--keep-activations/--no-keep-activations",
                                          help="keep activation shards (resume; principal angles)"),
) -> None:
    """Capture activations and write per-node directions with noise floors (safetensors + JSON)."""
    df = read_prompts(prompts, parse_flags=False)
    parents, labels = _load_taxonomy(taxonomy)
    rows, rejects = select_rows(df, all_conditions=all_conditions, known_nodes=set(parents) if parents else None)
    out.mkdir(parents=True, exist_ok=True)
    _write_rejects(out, rejects)
    if rejects:
        typer.echo(f"{len(rejects)} row(s) rejected; reasons in {out / 'rejects.jsonl'}", err=True)
    if not rows:
        raise AtlasError(f"{prompts}: no usable rows (see {out / 'rejects.jsonl'})")
    lm = load_model(model)
    texts = [r[0] for r in rows]
    acts_dir = out / "activations"
    acts = capture_activations(lm, texts, _parse_layers(layers), positions.split(","), batch_size=batch_size,
                               system=system, out_dir=acts_dir)
    strata = request_forms(texts) if match_form else None
    ds = extract_directions(
        acts, [r[1] for r in rows], [r[2] for r in rows], n_splits=n_splits, n_boot=n_boot, n_perm=n_perm,
        seed=seed, parents=parents, labels=labels, n_model_layers=lm.n_layers, progress=True, strata=strata,
    )
    ds.meta.update({
        **lm.provenance(),
        "prompts_file": str(prompts),
        "prompts_sha256": file_sha256(prompts),
        "prompt_ids_sha256": text_sha256("\n".join(texts)),
        "system": system,
        "batch_size": batch_size,
        "conditions": "all" if all_conditions else "unconditioned only",
        "n_rejected": len(rejects),
    })
    ds.save(out)
    DirectionPrompts(acts, texts, [r[1] for r in rows], [r[2] for r in rows], strata).save(out)
    if not keep_activations:
        shutil.rmtree(acts_dir, ignore_errors=True)
    typer.echo(f"{len(ds.nodes)} nodes x {len(ds.layers)} layers x {len(ds.positions)} positions -> {out}")


@app.command()
def overlap(
    directions: Path = typer.Argument(..., help="folder written by `directions extract`"),
    out: Path = typer.Option(..., "-o", "--out"),
    layer: int | None = typer.Option(None, "--layer", min=0, help="default: highest mean reliability below 0.8 depth"),
    position: str = typer.Option("-1", "--position"),
    method: str = typer.Option("diff_means", "--method", help="diff_means | vs_other | residual"),
    min_overlap: float = typer.Option(0.0, "--min-overlap", callback=number(-1.0, 1.0),
                                      help="edge when the noise-corrected cosine's 95% lower bound exceeds this"),
) -> None:
    """Overlap graph (GraphML, JSON, heatmap and graph PNGs) with the sibling permutation test."""
    ds = DirectionSet.load(directions)
    report = write_overlap(ds, out, layer, parse_position_label(position), method, min_overlap)
    n_overlap = sum(1 for e in report["edges"] if e.get("kind") == "overlap")
    st = report["sibling_test"]
    typer.echo(f"layer {report['layer']}, position {report['position']}, {method}: "
               f"{len(report['nodes'])} nodes, {n_overlap} overlap edges of {len(report['pairs'])} pairs -> {out}")
    if st.get("p_value") is not None:
        typer.echo(f"siblings vs others: mean cos {st['mean_sibling_cos']:.3f} vs {st['mean_other_cos']:.3f}, "
                   f"permutation p = {st['p_value']:.4f}")


@app.command()
def geometry(
    directions: Path = typer.Argument(..., help="folder written by `directions extract`"),
    position: str = typer.Option("-1", "--position"),
    method: str = typer.Option("diff_means", "--method"),
    angles_layer: int | None = typer.Option(None, "--angles-layer", min=0,
                                            help="also print principal angles between node subspaces here"),
    k: int = typer.Option(3, "--k", min=1, help="subspace dimension for principal angles"),
) -> None:
    """Print per-layer geometry: cosines, effective rank, first-component share, floors, AUROC, probe."""
    ds = DirectionSet.load(directions)
    pos = parse_position_label(position)
    rows = geometry_table(ds, pos, method)
    label = position_label(pos)
    auroc = ds.meta.get("auroc", {})
    probe = ds.meta.get("probe", {}).get("accuracy", {}).get(label)
    table = Table(title=f"{method} directions at position {label} ({len(ds.nodes)} nodes)")
    for col in ("layer", "mean cos", "min", "max", "split-half", "PR", "eff. rank", "1st comp", "AUROC", "probe"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows):
        aus = [a[label][i] for a in auroc.values() if label in a]
        table.add_row(
            str(r["layer"]), f"{r['mean_cos']:.3f}", f"{r['min_cos']:.3f}", f"{r['max_cos']:.3f}",
            f"{r.get('mean_split_half', float('nan')):.3f}", f"{r['participation_ratio']:.2f}",
            f"{r['effective_rank']:.2f}", f"{r['first_component']:.2f}",
            f"{sum(aus) / len(aus):.3f}" if aus else "-",
            f"{probe[i]:.3f}" if probe and probe[i] is not None else "-",
        )
    console = plain_console()  # node ids and labels in the rows are data, never markup
    console.print(table)
    if angles_layer is not None:
        _print_angles(ds, Path(directions), angles_layer, pos, k, console)


def _print_angles(ds: DirectionSet, folder: Path, layer: int, pos: Position, k: int, console: Console) -> None:
    labels_file = folder / DIRECTION_PROMPTS.name
    if not (folder / "activations").is_dir() or not labels_file.is_file():
        raise AtlasError(f"{folder}: principal angles need the activations (extract with --keep-activations)")
    labels = pd.read_parquet(labels_file)
    acts = load_shards(folder / "activations")
    groups = Groups.from_labels(labels["analysis_node"].astype(str).tolist(), labels["harmful"].astype(bool).tolist())
    res = principal_angle_matrix(acts, groups, layer, pos, k)
    table = Table(title=f"principal angles (degrees) between top-{k} node subspaces, layer {layer}")
    table.add_column("node a")
    table.add_column("node b")
    table.add_column("angles")
    ids = res["nodes"]
    for i, a in enumerate(ids):
        for j in range(i + 1, len(ids)):
            table.add_row(a, ids[j], ", ".join(f"{x:.1f}" for x in res["angles"][i, j]))
    console.print(table)


directions_causal.register(app)
