"""CLI: the causal protocol stage by stage under `refusal-atlas directions`.

`select`, `ablate`, `cross-ablate`, `steer`, `wording` and `conditions` each run one step of
`mechinterp.causal.protocol` — the steps `run`'s causal stage runs — and write the same files and
columns into `-o OUT`. Every command takes the model (e.g. an organism's `model/` folder) and a
direction folder from `directions extract`; most take a prompt table (an organism's
`prompts.parquet` carries train / held-out splits and categories). Later steps read the choice
`select` left in OUT (or in the directions folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import typer

from refusal_atlas.cli.directions_common import DirsOpt, ModelOpt, OutOpt, PromptsOpt, TaxOpt, TokensOpt, read_prompts
from refusal_atlas.cli.options import number
from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.models import LoadedModel, load_model
from refusal_atlas.lm.positions import Position, parse_position_label
from refusal_atlas.lm.settings import RunSettings
from refusal_atlas.mechinterp.causal import protocol
from refusal_atlas.mechinterp.causal.common import given_tokens
from refusal_atlas.mechinterp.causal.inputs import DirectionPrompts, direction_node_of, eval_sets_from_table
from refusal_atlas.mechinterp.causal.selection import Selection, candidate_layers, default_ablation_starts
from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
from refusal_atlas.mechinterp.scoring import RefusalTokens
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy

__all__ = ["register"]

REFUSAL_POSITION = -1  # the last post-instruction token, as in `run`
NEW_TOKENS = 16  # generated tokens behind every marker-detector rate, as in `run`


@dataclass(frozen=True)
class Setup:
    """The loaded inputs of one command."""

    lm: LoadedModel
    directions: DirectionSet
    table: pd.DataFrame
    taxonomy: Taxonomy | None


def _setup(model: str, directions: Path, prompts: Path, taxonomy: Path | None) -> Setup:
    ds = DirectionSet.load(directions)
    df = read_prompts(prompts)
    try:
        tax: Taxonomy | None = load_taxonomy(taxonomy)
    except AtlasError:
        if taxonomy is not None:
            raise
        tax = None  # no shipped taxonomy: nodes map only to themselves
    return Setup(load_model(model), ds, df, tax)


def _settings() -> RunSettings:
    return RunSettings(max_new_tokens=NEW_TOKENS)


def _tokens(lm: LoadedModel, df: pd.DataFrame, out: Path, ds: DirectionSet, tax: Taxonomy | None,
            explicit: str | None = None, n: int = 24) -> RefusalTokens:
    """Refusal-opening tokens: given, else those an earlier step left in OUT, else discovered from this
    model's own replies to the table's training prompts. Written to OUT's `refusal_tokens.json`."""
    if explicit:
        words = [w for w in explicit.split(",") if w.strip()]
        ids = sorted({lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})
        tokens = given_tokens(lm, ids, words)
        protocol.write_tokens(tokens, out, lm.revision)
        return tokens
    cached = protocol.load_tokens(out, lm.revision)
    if cached is not None:
        return cached
    sets, harmless = eval_sets_from_table(df, [*ds.nodes, POOLED], taxonomy=tax, split="train")
    harmful = [p for ps in sets.values() for p in ps][:n]
    if not harmful:
        harmful = list(df[df["harmful"].astype(bool)]["prompt"])[:n]
    found = protocol.discover_step(lm, harmful, harmless[:n], out, _settings().with_(max_new_tokens=12))
    t = found.tokens
    typer.echo(f"refusal-opening tokens: {t.tokens} (cover {t.coverage:.0%} of {t.n_refusals} refusals)")
    return t


def _session(setup: Setup, out: Path, refusal_tokens: str | None) -> protocol.CausalSession:
    out.mkdir(parents=True, exist_ok=True)
    tokens = _tokens(setup.lm, setup.table, out, setup.directions, setup.taxonomy, refusal_tokens)
    return protocol.CausalSession(setup.lm, setup.directions, tokens, out, _settings())


def _selected(s: protocol.CausalSession, directions: Path) -> tuple[Selection, float] | None:
    """`select`'s choice and steering dose, from OUT or else the directions folder."""
    return protocol.load_selection(s.out, s.lm.n_layers) or protocol.load_selection(directions, s.lm.n_layers)


def _position(s: protocol.CausalSession, directions: Path, position: str | None) -> Position:
    """--position, else the selected one, else the refusal position."""
    if position is not None:
        return parse_position_label(position)
    found = _selected(s, directions)
    return found[0].position if found else _default_position(s.directions)


def _chosen(s: protocol.CausalSession, directions: Path, layer: int | None, position: str | None
            ) -> tuple[int, Position, list[int] | None]:
    """(layer, position, ablation layers): `select`'s choice, unless --layer / --position override it (then
    every layer is ablated)."""
    found = _selected(s, directions)
    if layer is None and position is None and found is not None:
        return found[0].layer, found[0].position, found[0].ablation_layers
    if layer is None:
        if found is None:
            raise AtlasError(f"no selection in {s.out} or {directions}: run `directions select` first, or give --layer")
        layer = found[0].layer
    s.directions.layer_index(layer)
    return layer, _position(s, directions, position), None


def _default_position(ds: DirectionSet) -> Position:
    return REFUSAL_POSITION if REFUSAL_POSITION in ds.positions else ds.positions[-1]


def _node_list(ds: DirectionSet, nodes: str) -> list[str]:
    return [*ds.nodes, POOLED] if nodes == "all" else [x.strip() for x in nodes.split(",") if x.strip()]


def _captured(directions: Path) -> DirectionPrompts | None:
    return DirectionPrompts.load(directions / "activations", directions)


def register(app: typer.Typer) -> None:
    """Add the causal commands to the `directions` sub-app."""

    @app.command("select")
    def select_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        nodes: str = typer.Option(POOLED, "--nodes", help=f"'{POOLED}', 'all', or comma-separated nodes to select "
                                                             "beside the pooled direction"),
        layers: str | None = typer.Option(None, "--layers", help="candidate layers (default: as `run` chooses them)"),
        positions: str | None = typer.Option(None, "--positions", help="candidate positions (default: -1)"),
        n_val: int = typer.Option(16, "--n-val", min=1, help="validation prompts per node and harmless"),
        kl_threshold: float = typer.Option(0.1, "--kl-threshold", callback=number(0.0)),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Choose the pooled direction's layer, position, ablation scope and steering dose (bypass / induce / KL,
        Arditi et al.) by the rule `run` applies; writes selection.parquet, selection.json, steering_dose.parquet."""
        setup = _setup(model, directions, prompts, taxonomy)
        s = _session(setup, out, refusal_tokens)
        ds, lm = setup.directions, setup.lm
        sets, harmless = eval_sets_from_table(setup.table, ds.nodes, taxonomy=setup.taxonomy, split="train")
        harmful_val = [p for ps in sets.values() for p in ps][:n_val]
        others = [n for n in _node_list(ds, nodes) if n != POOLED]
        layer_list = [int(x) for x in layers.split(",")] if layers else candidate_layers(lm.n_layers, ds.layers)
        pos_list = ([parse_position_label(p) for p in positions.split(",")] if positions
                    else [_default_position(ds)])
        chosen = protocol.select_step(s, harmful_val, harmless[:n_val], layers=layer_list, positions=pos_list,
                                      ablation_starts=default_ablation_starts(lm.n_layers), kl_threshold=kl_threshold,
                                      node_val={n: sets.get(n, [])[:n_val] for n in others})
        for sel in (chosen.pooled, *chosen.others):
            flag = "" if sel.passed_filters else " (no candidate passed the filters)"
            scope = f"layers {sel.ablate_from}+" if sel.ablate_from else "every layer"
            typer.echo(f"{sel.node}: layer {sel.layer}, position {sel.position}, ablated in {scope}{flag}")
        typer.echo(f"steering dose {chosen.coefficient:g} -> {out}")

    @app.command("ablate")
    def ablate_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        split: str = typer.Option("heldout", "--split", help="evaluate on this split of the prompt table"),
        n: int = typer.Option(32, "--n", min=1, help="harmless prompts"),
        seed: int = typer.Option(0, "--seed", min=0, help="seed of the bootstrap resamples"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """The headline: the selected pooled direction ablated on harmful and added on harmless prompts
        (pooled.json); with the extraction's activations also its stability and the refusal cone."""
        setup = _setup(model, directions, prompts, taxonomy)
        s = _session(setup, out, refusal_tokens)
        found = _selected(s, directions)
        if found is None:
            raise AtlasError(f"no selection in {out} or {directions}: run `directions select` first")
        sel, coeff = found
        sets, harmless = eval_sets_from_table(setup.table, setup.directions.nodes, taxonomy=setup.taxonomy,
                                              split=split)
        harmful = [p for ps in sets.values() for p in ps]
        harmless = harmless[:n]
        headline = protocol.pooled_step(s, harmful, harmless, sel, coeffs=(coeff,) if coeff == 1.0 else (coeff, 1.0))
        captured = _captured(directions)
        if captured is not None:
            protocol.stability_step(s, captured, harmful, sel, n_boot=5, seed=seed)
            protocol.cone_step(s, captured, harmful, harmless, sel)
        typer.echo(f"refusal {headline['refusal_before']:.2f} -> {headline['refusal_after']:.2f} under ablation "
                   f"(harmless KL {headline['harmless_kl']:.3f}); addition induces "
                   f"{headline['induced_refusal_rate']:.2f} -> {out}")

    @app.command("cross-ablate")
    def cross_ablate_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        layer: int | None = typer.Option(None, "--layer", min=0, help="default: the selected layer"),
        position: str | None = typer.Option(None, "--position"),
        methods: str = typer.Option("diff_means,residual", "--methods"),
        generate_rates: bool = typer.Option(False, "--generate/--no-generate",
                                            help="also generate and apply the marker detector (slower)"),
        split: str = typer.Option("heldout", "--split", help="evaluate on this split of the prompt table"),
        n: int = typer.Option(32, "--n", min=1, help="harmless prompts"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Ablate each node's direction (and the pooled one) → refusal on every node's prompts."""
        setup = _setup(model, directions, prompts, taxonomy)
        s = _session(setup, out, refusal_tokens)
        lay, pos, scope = _chosen(s, directions, layer, position)
        sets, harmless = eval_sets_from_table(setup.table, setup.directions.nodes, taxonomy=setup.taxonomy,
                                              split=split)
        protocol.cross_ablation_step(s, sets, harmless[:n], layer=lay, position=pos, ablation_layers=scope,
                                     methods=[m.strip() for m in methods.split(",")], generate_rates=generate_rates)
        summary = pd.read_parquet(out / "cross_ablation_summary.parquet")
        typer.echo(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        typer.echo(f"-> {out}")

    @app.command("steer")
    def steer_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        nodes: str = typer.Option("all", "--nodes", help=f"comma-separated nodes, '{POOLED}', or 'all'"),
        layers: str | None = typer.Option(None, "--layers",
                                          help="default: the first and middle candidate layers and the selected one"),
        position: str | None = typer.Option(None, "--position"),
        coeffs: str = typer.Option("1.0", "--coeffs"),
        n: int = typer.Option(32, "--n", min=1, help="harmless prompts"),
        generate_rates: bool = typer.Option(False, "--generate/--no-generate",
                                            help="also generate and apply the marker detector (slower)"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Add a node's direction to harmless prompts, layer by layer → induced refusal."""
        setup = _setup(model, directions, prompts, taxonomy)
        s = _session(setup, out, refusal_tokens)
        pos = _position(s, directions, position)
        _, harmless = eval_sets_from_table(setup.table, setup.directions.nodes, taxonomy=setup.taxonomy,
                                           split="heldout")
        if layers:
            layer_list = [int(x) for x in layers.split(",")]
        else:
            found = _selected(s, directions)
            if found is None:
                raise AtlasError(f"no selection in {out} or {directions}: run `directions select` first, or give "
                                 "--layers")
            cands = candidate_layers(setup.lm.n_layers, setup.directions.layers)
            layer_list = sorted({cands[0], cands[len(cands) // 2], found[0].layer})
        table = protocol.steering_step(s, _node_list(setup.directions, nodes), harmless[:n], layers=layer_list,
                                       position=pos, coeffs=[float(c) for c in coeffs.split(",")],
                                       generate_rates=generate_rates)
        cols = ["node", "layer", "coeff", "first_token_refusal_rate", "induced_refusal_rate"]
        typer.echo(table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    @app.command("wording")
    def wording_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        position: str | None = typer.Option(None, "--position"),
        organism: Path | None = typer.Option(None, "--organism", help="organism folder: compare with its wordings"),
        k: int = typer.Option(8, "--k", min=1, help="top tokens per direction"),
        seed: int = typer.Option(0, "--seed", min=0, help="seed of the probe's folds"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Wording vs detection: per-layer node probe accuracy beside logit-lens refusal-token promotion."""
        captured = _captured(directions)
        if captured is None:
            raise AtlasError(f"{directions}: wording needs the activations (extract with --keep-activations)")
        setup = _setup(model, directions, prompts, taxonomy)
        s = _session(setup, out, refusal_tokens)
        pos = _position(s, directions, position)
        wordings, shared = None, None
        if organism is not None:
            info = json.loads((organism / "organism.json").read_text(encoding="utf-8"))
            wordings = {n: p["refusal_text"] for n, p in info["policy"].items() if n in setup.directions.nodes}
            shared = (info.get("wording") or {}).get("shared")
        res = protocol.wording_step(s, captured, position=pos, wordings=wordings, shared_wording=shared, seed=seed,
                                    lens_layers=candidate_layers(setup.lm.n_layers, setup.directions.layers), k=k)
        typer.echo(res.to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    @app.command("conditions")
    def conditions_cmd(
        out: Path = OutOpt,
        directions: Path = DirsOpt,
        prompts: Path = PromptsOpt,
        model: str = ModelOpt,
        taxonomy: Path | None = TaxOpt,
        layer: int | None = typer.Option(None, "--layer", min=0, help="default: the selected layer"),
        position: str | None = typer.Option(None, "--position"),
        adherence: Path | None = typer.Option(None, "--adherence",
                                              help="organism adherence.parquet: reuse its refusal flags"),
        split: str = typer.Option("heldout", "--split"),
        seed: int = typer.Option(0, "--seed", min=0, help="seed of the bootstrap CIs"),
        refusal_tokens: str | None = TokensOpt,
    ) -> None:
        """Per node with rules: projection on its direction and refusal rate under each condition (CIs)."""
        setup = _setup(model, directions, prompts, taxonomy)
        s = _session(setup, out, refusal_tokens)
        lay, pos, _ = _chosen(s, directions, layer, position)
        rows = setup.table[setup.table["harmful"].astype(bool)]
        if "split" in rows and (rows["split"] == split).any():
            rows = rows[rows["split"] == split]
        if adherence is not None:
            adh = pd.read_parquet(adherence)[["prompt_id", "refused"]].rename(columns={"refused": "_refused"})
            rows = rows.merge(adh, on="prompt_id", how="inner")
        node_of = {n: direction_node_of(n, setup.directions.nodes, setup.taxonomy) for n in rows["node"].unique()}
        with_rules = set(rows.loc[rows["condition"].fillna("") != "", "node"])
        rows = rows[rows["node"].isin(with_rules)].reset_index(drop=True)
        refused = rows.pop("_refused").tolist() if "_refused" in rows else None
        _, summary = protocol.conditions_step(s, rows, layer=lay, position=pos,
                                              node_of={k: v for k, v in node_of.items() if v}, refused=refused,
                                              refusal_measure="adherence" if refused is not None else "generated",
                                              seed=seed)
        typer.echo(summary.to_string(index=False))
