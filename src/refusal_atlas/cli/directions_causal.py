"""CLI: causal tests under `refusal-atlas directions` (select, cross-ablate, steer, wording, conditions).

A thin layer over `mechinterp.selection` and `mechinterp.experiments`. Every command takes the
model (e.g. an organism's `model/` folder), a direction folder from `directions extract`, and a
prompt table (an organism's `prompts.parquet` carries train / held-out splits and categories),
and writes Parquet tables plus a figure into `-o DIR`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from refusal_atlas.errors import AtlasError

ModelOpt = typer.Option("default", "--model",
                        help="model spec: 'default', a folder (e.g. ORGANISM/model), .gguf, hub id")
DirsOpt = typer.Option(..., "--directions", "-d", help="folder written by `directions extract`")
PromptsOpt = typer.Option(..., "--prompts", help="prompt table: prompt, node, harmful[, split, condition, category]")
OutOpt = typer.Option(..., "-o", "--out", help="output folder")
TaxOpt = typer.Option(None, "--taxonomy", "-t", help="taxonomy folder (maps nodes to ancestor directions)")
TokensOpt = typer.Option(None, "--refusal-tokens",
                         help="comma-separated refusal openers (first token of each); default: discovered from "
                              "the model's own refusals")


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _setup(model: str, directions: Path, prompts: Path, taxonomy: Path | None):
    from refusal_atlas.cli.directions import _read_prompts
    from refusal_atlas.lm.models import load_model
    from refusal_atlas.mechinterp.directions import DirectionSet

    ds = DirectionSet.load(directions)
    df = _read_prompts(prompts)
    tax = None
    if taxonomy is not None:
        from refusal_atlas.taxonomy.loader import load_taxonomy

        tax = load_taxonomy(taxonomy)
    else:
        try:
            from refusal_atlas.taxonomy.loader import load_taxonomy

            tax = load_taxonomy(None)
        except AtlasError:
            tax = None
    return load_model(model), ds, df, tax


def _position(ds, text: str | None):
    from refusal_atlas.lm.positions import parse_position_label

    if text is None:
        return -1 if -1 in ds.positions else ds.positions[-1]
    return parse_position_label(text)


def _layer(ds, lm, layer: int | None, *folders: Path) -> int:
    """--layer, else the pooled choice of a `directions select` run (in OUT or the directions folder)."""
    if layer is not None:
        ds.layer_index(layer)
        return layer
    for folder in folders:
        sel = folder / "selection.json"
        if sel.is_file():
            chosen = json.loads(sel.read_text()).get("pooled")
            if chosen and chosen.get("layer") in ds.layers:
                return int(chosen["layer"])
    below = [x for x in ds.layers if x < 0.8 * lm.n_layers] or ds.layers
    pick = below[len(below) // 2]
    typer.echo(f"no --layer and no selection.json: using layer {pick} (run `directions select` to choose one)",
               err=True)
    return pick


def _tokens(lm, df, out: Path, ds, tax, explicit: str | None = None, n: int = 24):
    """Refusal-opening tokens discovered from this model's own replies (cached in OUT), or given."""
    from refusal_atlas.mechinterp.causal.experiments import discover_tokens, eval_sets_from_table
    from refusal_atlas.mechinterp.scoring import RefusalTokens

    if explicit:
        words = [w for w in explicit.split(",") if w.strip()]
        ids = sorted({lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})
        return RefusalTokens(ids, [lm.tokenizer.decode([i]) for i in ids], [], [], float("nan"), 0, 0,
                             {"given": words})

    cache = out / "refusal_tokens.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("model") == lm.revision:
            return RefusalTokens.from_dict(data["tokens"])
    sets, harmless = eval_sets_from_table(df, [*ds.nodes, "@pooled"], taxonomy=tax, split="train")
    harmful = [p for ps in sets.values() for p in ps][:n]
    if not harmful:
        harmful = list(df[df["harmful"].astype(bool)]["prompt"])[:n]
    tokens, _, _ = discover_tokens(lm, harmful, harmless[:n])
    _json(cache, {"model": lm.revision, "tokens": tokens.to_dict()})
    typer.echo(f"refusal-opening tokens: {tokens.tokens} (cover {tokens.coverage:.0%} of {tokens.n_refusals} refusals)")
    return tokens


def _all_nodes_with_pooled(ds) -> list[str]:
    return ["@pooled", *ds.nodes]


def register(app: typer.Typer) -> None:
    """Add the causal commands to the `directions` sub-app."""

    @app.command("select")
    def select_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        nodes: str = typer.Option("@pooled", "--nodes", help="comma-separated nodes, '@pooled', or 'all'"),
        layers: str | None = typer.Option(None, "--layers", help="candidate layers (default: 8 below 0.8·L)"),
        positions: str | None = typer.Option(None, "--positions", help="candidate positions (default: all captured)"),
        n_val: int = typer.Option(16, "--n-val", help="validation prompts per node and harmless"),
        kl_threshold: float = typer.Option(0.1, "--kl-threshold"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Choose a (layer, position) per node by bypass / induce / KL scores (Arditi et al.)."""
        from refusal_atlas.lm.positions import parse_position_label
        from refusal_atlas.mechinterp.causal.experiments import eval_sets_from_table, save_table
        from refusal_atlas.mechinterp.causal.selection import select_all
        from refusal_atlas.mechinterp.interventions import layer_subset

        lm, ds, df, tax = _setup(model, directions, prompts, taxonomy)
        tokens = _tokens(lm, df, out, ds, tax, refusal_tokens)
        node_list = _all_nodes_with_pooled(ds) if nodes == "all" else [n.strip() for n in nodes.split(",")]
        sets, harmless = eval_sets_from_table(df, ds.nodes, taxonomy=tax, split="train")
        sets["@pooled"] = [p for ps in sets.values() for p in ps]
        val = {k: v[:n_val] for k, v in sets.items()}
        if layers:
            layer_list = [int(x) for x in layers.split(",")]
        else:
            grid = layer_subset(lm.n_layers, 8, 0.8)
            layer_list = [x for x in grid if x in ds.layers] or ds.layers
        pos_list = [parse_position_label(p) for p in positions.split(",")] if positions else None
        chosen, scores = select_all(lm, ds, node_list, val, harmless[:n_val], tokens, layers=layer_list,
                                    positions=pos_list, kl_threshold=kl_threshold)
        save_table(chosen, out / "selection.parquet")
        save_table(scores, out / "selection_scores.parquet")
        record = {r["node"]: r for r in chosen.to_dict("records")}
        _json(out / "selection.json", {"pooled": record.get("@pooled"), "nodes": record})
        for r in chosen.to_dict("records"):
            flag = "" if r["passed_filters"] else " (no candidate passed the filters)"
            typer.echo(f"{r['node']}: layer {r['layer']}, position {r['position']}{flag}")

    @app.command("cross-ablate")
    def cross_ablate_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        layer: int | None = typer.Option(None, "--layer"),
        position: str | None = typer.Option(None, "--position"),
        methods: str = typer.Option("diff_means,residual", "--methods"),
        generate_rates: bool = typer.Option(False, "--generate/--no-generate",
                                            help="also generate and apply the marker detector (slower)"),
        split: str = typer.Option("heldout", "--split", help="evaluate on this split of the prompt table"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Ablate each node's direction (and the pooled one) → refusal on every node's prompts."""
        from refusal_atlas.mechinterp.causal.experiments import (
            cross_ablation,
            cross_ablation_summary,
            eval_sets_from_table,
            plot_cross_ablation,
            save_table,
        )

        lm, ds, df, tax = _setup(model, directions, prompts, taxonomy)
        tokens = _tokens(lm, df, out, ds, tax, refusal_tokens)
        lay, pos = _layer(ds, lm, layer, out, directions), _position(ds, position)
        sets, harmless = eval_sets_from_table(df, ds.nodes, taxonomy=tax, split=split)
        table = cross_ablation(lm, ds, sets, harmless[:32], tokens, layer=lay, position=pos,
                               methods=[m.strip() for m in methods.split(",")], generate_rates=generate_rates)
        save_table(table, out / "cross_ablation.parquet")
        summary = cross_ablation_summary(table)
        save_table(summary, out / "cross_ablation_summary.csv")
        plot_cross_ablation(table, out / "cross_ablation.png")
        typer.echo(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        typer.echo(f"-> {out}")

    @app.command("steer")
    def steer_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        nodes: str = typer.Option("@pooled", "--nodes", help="comma-separated nodes, '@pooled', or 'all'"),
        layers: str | None = typer.Option(None, "--layers", help="default: 6 layers below 0.8·L"),
        position: str | None = typer.Option(None, "--position"),
        coeffs: str = typer.Option("1.0", "--coeffs"),
        n: int = typer.Option(32, "--n", help="harmless prompts"),
        generate_rates: bool = typer.Option(True, "--generate/--no-generate"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Add a node's direction to harmless prompts, layer by layer → induced refusal."""
        from refusal_atlas.mechinterp.causal.experiments import (
            eval_sets_from_table,
            plot_steering,
            save_table,
            steering,
        )
        from refusal_atlas.mechinterp.interventions import layer_subset

        lm, ds, df, tax = _setup(model, directions, prompts, taxonomy)
        tokens = _tokens(lm, df, out, ds, tax, refusal_tokens)
        _, harmless = eval_sets_from_table(df, ds.nodes, taxonomy=tax, split="heldout")
        node_list = _all_nodes_with_pooled(ds) if nodes == "all" else [x.strip() for x in nodes.split(",")]
        if layers:
            layer_list = [int(x) for x in layers.split(",")]
        else:
            layer_list = [x for x in layer_subset(lm.n_layers, 6, 0.8) if x in ds.layers] or ds.layers
        table = steering(lm, ds, node_list, harmless[:n], tokens, layers=layer_list, position=_position(ds, position),
                         coeffs=[float(c) for c in coeffs.split(",")], generate_rates=generate_rates)
        save_table(table, out / "steering.parquet")
        plot_steering(table, out / "steering.png")
        cols = ["node", "layer", "coeff", "first_token_refusal_rate", "induced_refusal_rate"]
        typer.echo(table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    @app.command("wording")
    def wording_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        model: str = ModelOpt,
        position: str | None = typer.Option(None, "--position"),
        organism: Path | None = typer.Option(None, "--organism", help="organism folder: compare with its wordings"),
        prompts: Path | None = typer.Option(None, "--prompts", help="prompt table for discovering refusal tokens"),
        k: int = typer.Option(8, "--k", help="top tokens per direction"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Wording vs detection: per-layer node probe accuracy beside logit-lens refusal-token promotion."""
        from refusal_atlas.lm.capture import load_shards
        from refusal_atlas.lm.models import load_model
        from refusal_atlas.mechinterp.causal.experiments import save_table, wording_vs_detection
        from refusal_atlas.mechinterp.directions import DirectionSet
        from refusal_atlas.mechinterp.logit_lens import lens_table

        ds = DirectionSet.load(directions)
        labels_file = directions / "labels.json"
        if not (directions / "activations").is_dir() or not labels_file.is_file():
            raise AtlasError(f"{directions}: wording needs the activations (extract with --keep-activations)")
        labels = json.loads(labels_file.read_text())
        acts = load_shards(directions / "activations")
        lm = load_model(model)
        pos = _position(ds, position)
        import pandas as pd

        table = None
        if prompts is not None:
            from refusal_atlas.cli.directions import _read_prompts

            table = _read_prompts(prompts)
        else:
            table = pd.DataFrame({"prompt": labels["prompts"], "node": labels["nodes"], "harmful": labels["harmful"]})
        tokens = _tokens(lm, table, out, ds, None, refusal_tokens)
        wordings, shared = None, None
        if organism is not None:
            info = json.loads((organism / "organism.json").read_text())
            wordings = {n: p["refusal_text"] for n, p in info["policy"].items()}
            shared = info["wording"]["shared"]
        res = wording_vs_detection(lm, ds, acts, labels["nodes"], labels["harmful"], tokens.ids, position=pos,
                                   wordings=wordings, shared_wording=shared)
        top, scores = lens_table(lm, ds, _all_nodes_with_pooled(ds), pos, k=k, refusal_ids=tokens.ids)
        save_table(res, out / "wording_vs_detection.parquet")
        save_table(top, out / "logit_lens_tokens.parquet")
        save_table(scores, out / "logit_lens_scores.parquet")
        typer.echo(res.to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    @app.command("conditions")
    def conditions_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        layer: int | None = typer.Option(None, "--layer"),
        position: str | None = typer.Option(None, "--position"),
        adherence: Path | None = typer.Option(None, "--adherence",
                                              help="organism adherence.parquet: reuse its refusal flags"),
        split: str = typer.Option("heldout", "--split"),
    ) -> None:
        """Per node with rules: projection on its direction and refusal rate under each condition (CIs)."""
        import pandas as pd

        from refusal_atlas.mechinterp.causal.experiments import (
            condition_summary,
            condition_table,
            direction_node_of,
            save_table,
        )

        lm, ds, df, tax = _setup(model, directions, prompts, taxonomy)
        lay, pos = _layer(ds, lm, layer, out, directions), _position(ds, position)
        rows = df[df["harmful"].astype(bool)]
        if "split" in rows and (rows["split"] == split).any():
            rows = rows[rows["split"] == split]
        if adherence is not None:
            adh = pd.read_parquet(adherence)[["prompt_id", "refused"]].rename(columns={"refused": "_refused"})
            rows = rows.merge(adh, on="prompt_id", how="inner")
        node_of = {n: direction_node_of(n, ds.nodes, tax) for n in rows["node"].unique()}
        with_rules = set(rows.loc[rows["condition"].fillna("") != "", "node"])
        rows = rows[rows["node"].isin(with_rules)].reset_index(drop=True)
        refused = rows.pop("_refused").tolist() if "_refused" in rows else None
        table = condition_table(lm, ds, rows, layer=lay, position=pos,
                                node_of={k: v for k, v in node_of.items() if v}, refused=refused)
        save_table(table, out / "conditions.parquet")
        summary = condition_summary(table)
        save_table(summary.astype({"projection_delta_ci": str, "refusal_delta_ci": str}),
                   out / "conditions_summary.csv")
        typer.echo(summary.to_string(index=False))
