"""CLI: `refusal-atlas sae train | info` (thin layer over refusal_atlas.mechinterp.sae)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from refusal_atlas.cli.console import sub_app
from refusal_atlas.errors import AtlasError
from refusal_atlas.mechinterp.sae import load_sae
from refusal_atlas.mechinterp.sae.data import open_activations
from refusal_atlas.mechinterp.sae.train import TrainSettings, train_sae

app = sub_app("Sparse autoencoders (SAELens format): train, inspect, features.")


@app.command("train")
def train(
    acts: Path = typer.Argument(..., help="safetensors file with acts [n, d_in], or a capture folder"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder (SAELens format: cfg.json + sae_weights)"),
    layer: int | None = typer.Option(None, "--layer", help="layer to train on (required for multi-layer captures)"),
    width: int = typer.Option(2048, "--width", help="number of latents (d_sae)"),
    k: int = typer.Option(32, "--k", help="active latents per token (TopK)"),
    epochs: int = typer.Option(5, "--epochs"),
    batch_size: int = typer.Option(512, "--batch-size"),
    lr: float = typer.Option(2e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a TopK SAE; rerunning the same command resumes from the folder's checkpoint."""

    source = open_activations(acts, layer)
    _, m = train_sae(source, out, TrainSettings(width=width, k=k, epochs=epochs, batch_size=batch_size, lr=lr,
                                                seed=seed), progress=progress)
    Console().print(f"SAE written to {escape(str(out))}: FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, "
                    f"dead {m['dead_fraction']:.1%}, {int(m['n_rows'])} rows, {m['seconds']:.1f} s")


@app.command("info")
def info(path: Path = typer.Argument(..., help="SAE folder (SAELens format or Gemma Scope params.npz)")) -> None:
    """Print an SAE's architecture, sizes and hook."""

    sae = load_sae(path)
    c = sae.cfg
    Console().print(f"{c.architecture} SAE: d_in {c.d_in}, d_sae {c.d_sae}"
                    + (f", k {c.k}" if c.k else "")
                    + f", hook {escape(str(c.metadata.get('hook_name')))} (layer {c.hook_layer})")


@app.command("features")
def features(
    run: Path = typer.Argument(..., help="a run's output folder (or its sae/ folder) holding features.parquet"),
    node: str | None = typer.Option(None, "--node", help="only this node"),
    top: int = typer.Option(10, "--top", help="features per node to show"),
) -> None:
    """Show each node's selected SAE features: decoder cosine, attribution, activations, contexts, tokens."""


    table_path = next((p for p in (run / "features.parquet", run / "sae" / "features.parquet") if p.is_file()), None)
    if table_path is None:
        raise AtlasError(f"{run}: no features.parquet (run the sae stage first)")
    df = pd.read_parquet(table_path)
    if node is not None:
        if node not in set(df["node"]):
            raise AtlasError(f"{table_path}: no node {node!r}; nodes: {', '.join(sorted(set(df['node'])))}")
        df = df[df["node"] == node]
    console = Console()
    for name, rows in df.groupby("node", sort=True):
        t = Table(title=escape(str(name)))
        for col in ("rank", "feature", "cos", "attribution", "act node", "act harmless", "top context", "promotes"):
            t.add_column(col)
        for r in rows.head(top).itertuples():
            contexts = list(r.top_contexts)
            t.add_row(str(r.rank), str(r.feature), f"{r.decoder_cosine:.3f}", f"{r.attribution:.3g}",
                      f"{r.mean_act_node:.3g}", f"{r.mean_act_harmless:.3g}",
                      escape(contexts[0]) if contexts else "", escape(" ".join(map(repr, r.promoted_tokens[:5]))))
        console.print(t)
