"""CLI: `refusal-atlas sae train | info | features` and `query feature` (thin layers over
refusal_atlas.mechinterp.sae and refusal_atlas.atlas.query.feature). Atlas text is printed as rich
`Text`, never parsed as markup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from refusal_atlas.atlas.query.feature import feature_report
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.cli.console import sub_app
from refusal_atlas.cli.options import number
from refusal_atlas.errors import AtlasError
from refusal_atlas.mechinterp.sae import load_sae
from refusal_atlas.mechinterp.sae.data import open_activations
from refusal_atlas.mechinterp.sae.train import TrainSettings, train_sae
from refusal_atlas.terminal import one_line, safe_console

app = sub_app("Sparse autoencoders (SAELens format): train, inspect, features.")


@app.command("train")
def train(
    acts: Path = typer.Argument(..., help="safetensors file with acts [n, d_in], or a capture folder"),
    out: Path = typer.Option(..., "-o", "--out", help="output folder (SAELens format: cfg.json + sae_weights)"),
    layer: int | None = typer.Option(None, "--layer", min=0,
                                     help="layer to train on (required for multi-layer captures)"),
    width: int = typer.Option(2048, "--width", min=1, help="number of latents (d_sae)"),
    k: int = typer.Option(32, "--k", min=1, help="active latents per token (TopK)"),
    epochs: int = typer.Option(5, "--epochs", min=1),
    batch_size: int = typer.Option(512, "--batch-size", min=1),
    lr: float = typer.Option(2e-3, "--lr", callback=number(0.0, above=True)),
    seed: int = typer.Option(0, "--seed", min=0),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a TopK SAE; rerunning the same command resumes from the folder's checkpoint."""

    source = open_activations(acts, layer)
    _, m = train_sae(source, out, TrainSettings(width=width, k=k, epochs=epochs, batch_size=batch_size, lr=lr,
                                                seed=seed), progress=progress)
    safe_console().print(f"SAE written to {escape(str(out))}: FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, "
                    f"dead {m['dead_fraction']:.1%}, {int(m['n_rows'])} rows, {m['seconds']:.1f} s")


@app.command("info")
def info(path: Path = typer.Argument(..., help="SAE folder (SAELens format or Gemma Scope params.npz)")) -> None:
    """Print an SAE's architecture, sizes and hook."""

    sae = load_sae(path)
    c = sae.cfg
    safe_console().print(f"{c.architecture} SAE: d_in {c.d_in}, d_sae {c.d_sae}"
                    + (f", k {c.k}" if c.k else "")
                    + f", hook {escape(str(c.metadata.get('hook_name')))} (layer {c.hook_layer})")


@app.command("features")
def features(
    run: Path = typer.Argument(..., help="a run's output folder (or its sae/ folder) holding features.parquet"),
    node: str | None = typer.Option(None, "--node", help="only this node"),
    top: int = typer.Option(10, "--top", min=1, help="features per node to show"),
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
    console = safe_console()
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


# ------------------------------------------------------------------ `query feature` and features in `query node`
def _cell(value: Any, digits: int = 3) -> Text:
    """A table cell as plain text (atlas strings are data, never markup)."""
    if value is None or (isinstance(value, float) and value != value):
        return Text("–")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, float):
        return Text(f"{value:.{digits}g}" if abs(value) >= 1000 or 0 < abs(value) < 1e-3 else f"{value:.{digits}f}")
    if isinstance(value, list | tuple):
        return Text(" ".join(repr(v) if isinstance(v, str) else str(v) for v in value))
    return Text(one_line(str(value)))


def _rows_table(title: str, columns: list[str], rows: list[list[Any]], free: tuple[str, ...] = ()) -> Table:
    table = Table(title=Text(title), title_justify="left", header_style="bold")
    for col in columns:
        table.add_column(Text(col), overflow="fold", no_wrap=col not in free, ratio=1 if col in free else None)
    for row in rows:
        table.add_row(*[_cell(v) for v in row])
    return table


def show_node_features(report: dict[str, Any], console: Console, top: int = 10) -> None:
    """The `sae` part of `query node`: the node's selected latents and the cross-clamp of its K* set."""
    sae = report.get("sae")
    if sae is None:
        console.print(Text("SAE features: not run (no sae/ in this atlas)"))
        return
    feats = sae.get("features") or []
    node = report.get("directions_of") or report.get("node")
    if not feats:
        console.print(Text(f"SAE features: none selected for {node}"))
        return
    console.print(_rows_table(
        f"SAE features of {node} (layer {sae.get('layer')}; top {min(top, len(feats))} of {len(feats)})",
        ["rank", "feature", "cos", "attribution", "act node", "act harmless", "top context", "promotes"],
        [[f.get("rank"), f.get("feature"), f.get("decoder_cosine"), f.get("attribution"), f.get("mean_act_node"),
          f.get("mean_act_harmless"), (f.get("top_contexts") or [None])[0], (f.get("promoted_tokens") or [])[:5]]
         for f in feats[:top]], free=("top context", "promotes")))
    clamp = sae.get("clamp") or []
    if clamp:
        console.print(_rows_table(f"clamping {node}'s features: refusal on each node's held-out prompts",
                                  ["target", "method", "refusal before", "refusal after", "n", "harmless KL"],
                                  [[r.get("target"), r.get("method"), r.get("refusal_before"),
                                    r.get("refusal_after"), r.get("n"), r.get("harmless_kl")] for r in clamp]))


def show_feature(result: dict[str, Any], console: Console) -> None:
    sae = result.get("sae") or {}
    console.print(Text(f"SAE feature {result['feature']} — layer {sae.get('layer')} of {sae.get('model')}, "
                       f"{sae.get('width')} latents, k {sae.get('k')}, weights sha256 {sae.get('sae_sha256')}",
                       style="bold"))
    if not result.get("selected_by"):
        console.print(Text(result.get("note") or "no node selected this latent"))
        return
    console.print(_rows_table("selected by", ["node", "label", "rank", "cos", "attribution", "± se", "act node",
                                              "act harmless"],
                              [[s.get("node"), result["labels"].get(s.get("node")), s.get("rank"),
                                s.get("decoder_cosine"), s.get("attribution"), s.get("attribution_se"),
                                s.get("mean_act_node"), s.get("mean_act_harmless")] for s in result["selections"]],
                              free=("label",)))
    console.print(Text("top-activating contexts (the token in ⟦ ⟧):", style="bold"))
    for context in result.get("top_contexts") or []:
        console.print(Text(f"  {one_line(context)}"))
    console.print(Text(f"promotes: {' '.join(repr(t) for t in result.get('promoted_tokens') or [])}"))
    if result.get("shared") is not None:
        console.print(Text("shared: selected by several nodes" if result["shared"] else "node-specific"))
    clamp = result.get("clamp") or []
    if clamp:
        console.print(_rows_table("clamping the K* set of a node holding it", ["source", "target", "refusal before",
                                                                               "refusal after", "n", "harmless KL"],
                                  [[r.get("source"), r.get("target"), r.get("refusal_before"),
                                    r.get("refusal_after"), r.get("n"), r.get("harmless_kl")] for r in clamp]))


def register_feature_query(query_app: typer.Typer) -> None:
    """Add `query feature ID` to the `query` sub-app."""

    @query_app.command("feature")
    def feature_cmd(
        feature_id: str = typer.Argument(..., help="Latent index in the run's SAE, e.g. 123."),
        atlas: Path = typer.Option(Path("atlas-out"), "--atlas", "-a", help="Atlas folder written by `run`."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of tables."),
    ) -> None:
        """One SAE latent: the nodes that selected it (cosine, attribution), its contexts, tokens, clamp."""
        result = feature_report(AtlasStore.open(atlas), feature_id)
        if as_json:
            typer.echo(json.dumps(result, indent=2, ensure_ascii=False, default=str))
        else:
            console = safe_console(highlight=False)
            show_feature(result, console if console.is_terminal else safe_console(highlight=False, width=160))
