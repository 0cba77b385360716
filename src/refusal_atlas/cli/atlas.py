"""CLI: `refusal-atlas run` and `refusal-atlas query ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.pipeline import DEFAULT_OUT, RunConfig, headline_table, parse_sizes, run
from refusal_atlas.cli.atlas_query import register_query
from refusal_atlas.organism.settings import OrganismSettings
from refusal_atlas.terminal import safe_console

MODEL_HELP = ("`default` (SmolLM2-135M-Instruct, turned into a refusing organism first), a model folder, "
              "a .gguf file or a hub id.")


def register(app: typer.Typer) -> None:
    """Attach `run` and the `query` group to the main app."""

    @app.command("run")
    def run_cmd(
        model: Annotated[str, typer.Option(help=MODEL_HELP)] = "default",
        taxonomy: Annotated[Path | None, typer.Option(help="Taxonomy folder (default: the shipped one).")] = None,
        out: Annotated[Path, typer.Option(help="Output folder.")] = DEFAULT_OUT,
        quick: Annotated[bool, typer.Option(help="A reduced run (CI, smoke tests).")] = False,
        resume: Annotated[bool, typer.Option(help="Skip stages whose inputs did not change.")] = True,
        seed: Annotated[int, typer.Option(min=0, help="Seed for every random choice.")] = 0,
        organism: Annotated[bool | None, typer.Option(help="Build a refusing organism from the base model "
                                                           "(default: only for `default`).")] = None,
        min_prompts: Annotated[int, typer.Option(min=2, help="Minimum training prompts for a node's direction.")] = 8,
        max_nodes: Annotated[int | None, typer.Option(min=1, help="At most this many analysis nodes.")] = None,
        size: Annotated[list[str] | None, typer.Option(
            help="Override a stage budget, KEY=INT (repeatable), e.g. --size collect_limit=600 --size "
                 "per_node_eval=16; keys: see `RunConfig.sizes()`.")] = None,
        organism_setting: Annotated[list[str] | None, typer.Option(
            help="Override an organism setting, KEY=VALUE (repeatable), e.g. --organism-setting epochs=4 "
                 "--organism-setting wording_token_weight=5 (the recipe that says its planted wordings; "
                 "not the validated one); keys: see `OrganismSettings`.")] = None,
        threads: Annotated[int | None, typer.Option(min=1,
            help="torch CPU threads (default: per stage, the cores other processes leave free).")] = None,
        reference: Annotated[str | None, typer.Option(
            help="The model the analysed one was fine-tuned from (same architecture): enables the restoration "
                 "scan that says which blocks a node's refusal lives in (default: the organism's base model "
                 "when an organism is built, else none).")] = None,
    ) -> None:
        """Run every stage, from the taxonomy to report.html (cached; a rerun resumes)."""
        cfg = RunConfig(model=model, taxonomy=taxonomy, out=out, quick=quick, resume=resume, seed=seed,
                        organism=organism, min_prompts=min_prompts, max_nodes=max_nodes, threads=threads,
                        reference=reference)
        if size:
            cfg.extra["sizes"] = parse_sizes(size, cfg.sizes())
        if organism_setting:
            cfg.extra["organism"] = OrganismSettings.parse_overrides(organism_setting)
        console = safe_console(stderr=True)
        result = run(cfg, console)
        m = result["metrics"]
        console.print(f"[bold green]atlas written to {escape(str(out))}[/bold green] "
                      f"({result['manifest']['total_seconds']:.0f} s): "
                      f"{', '.join(a.path for a in (schema.REPORT_HTML, schema.ATLAS_TTL, schema.METRICS))}")
        console.print(headline_table(m))

    query_app = typer.Typer(no_args_is_help=True)
    app.add_typer(query_app, name="query", help="Ask the atlas which directions correspond to which harm sources.")
    register_query(query_app)
