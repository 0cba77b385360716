"""CLI: `refusal-atlas curate cluster` and `curate map` (thin layer over curation.cluster_run / mapping).

`register(app)` adds both commands to the `curate` sub-app.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import typer

from refusal_atlas.cli.options import number
from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.curation.cluster_run import cluster_corpus, replies_config
from refusal_atlas.curation.cluster_store import ASSIGNMENTS
from refusal_atlas.curation.map_folder import map_folder
from refusal_atlas.curation.proposals import clean_text
from refusal_atlas.curation.stability import ari_phrase
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import check_not_same_file


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cluster(
    corpus: Path = typer.Argument(..., help="Corpus or prompt set (.parquet, .jsonl or .csv)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (assignments, clusters.json, plots)."),
    text: str = typer.Option("response", "--text", help="Column to cluster: response or prompt (any column)."),
    label_by: str | None = typer.Option(None, "--label-by", help="Column that names the clusters (keywords, "
                                        "examples), e.g. cluster --text response --label-by prompt: refusals "
                                        "grouped by wording, described by what was asked. Default: --text."),
    net_of: str = typer.Option("auto", "--net-of", help="Cluster the text net of this column's content (a ridge "
                               "fit's residual): replies grouped by how they are worded rather than by the "
                               "request they echo (a wording tied to the request, e.g. one per harm, is weakened "
                               "too). auto: `prompt` when clustering `response` and the table has one; none: "
                               "off."),
    only_refused: bool = typer.Option(False, "--only-refused", help="Cluster only rows with refused = true."),
    embedder: str | None = typer.Option(None, "--embedder", help="sentence-transformers name or folder "
                                        "(default: offline all-MiniLM-L6-v2), or residual:MODEL[@LAYER] for a "
                                        "chat model's own residual stream (e.g. residual:default@24)."),
    min_cluster_size: int | None = typer.Option(None, "--min-cluster-size", min=2,
                                                help="Smallest cluster. Default 10; for replies (--text response) "
                                                     "max(3, rows/40), and a reply repeated twice is a wording of "
                                                     "its own."),
    min_cluster_fraction: float = typer.Option(0.0, "--min-cluster-fraction", callback=number(0.0, 0.5),
                                               help="Also require this share of the rows per cluster, 0 to 0.5 "
                                                    "(e.g. 0.01 for templated corpora)."),
    seeds: int = typer.Option(len(ClusterConfig().seeds), "--seeds", min=1, help="UMAP seeds in the consensus."),
    seed: int = typer.Option(0, "--seed", min=0, help="First seed block (seeds seed*1000 .. seed*1000+N-1)."),
    stability_runs: int = typer.Option(5, "--stability-runs", min=0,
                                       help="Seed re-runs and resamples for stability.json (0 = skip)."),
    reassign_outliers: bool = typer.Option(False, "--reassign-outliers",
                                           help="Move outliers to their nearest cluster (logged per row)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the embedding cache."),
) -> None:
    """Embed, cluster (consensus UMAP → HDBSCAN), check stability, and write the clusters folder."""
    if out.exists() and not out.is_dir():
        raise AtlasError(f"{out}: is a file; -o names the output folder")
    check_not_same_file(out / ASSIGNMENTS, corpus)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = ClusterConfig(min_cluster_size=min_cluster_size or ClusterConfig().min_cluster_size,
                         min_cluster_fraction=min_cluster_fraction, reassign_outliers=reassign_outliers,
                         seeds=tuple(seed * 1000 + j for j in range(seeds)))
    config: ClusterConfig | Callable[[int], ClusterConfig] = base
    if min_cluster_size is None and text == "response":
        # sized once the replies to cluster are counted
        config = partial(replies_config, seeds=base.seeds, min_cluster_fraction=min_cluster_fraction,
                         reassign_outliers=reassign_outliers)
    run = cluster_corpus(corpus, out, text_column=text, only_refused=only_refused, embedder=embedder,
                         config=config, stability_runs=stability_runs, progress=_say, cache=not no_cache,
                         label_column=label_by, net_of_column=net_of)
    meta = run.meta
    stab = (meta.get("stability") or {}).get("seed_pairwise_ari") or {}
    extra = f", {ari_phrase('seed-to-seed ARI', stab, meta['n_clusters'])}" if stab else ""
    net_col = clean_text((meta.get("net_of") or {}).get("column", ""), 60)
    net = f", net of {net_col}; --net-of none: as they are" if meta.get("net_of") else ""
    typer.echo(f"{meta['input']['clustered']} rows -> {meta['n_clusters']} clusters, "
               f"{100 * meta['outlier_fraction']:.1f}% outliers{extra} ({meta['method']}{net}); wrote {out}/")
    tree = meta.get("tree") or {}
    if len(tree.get("levels", [])) > 1:
        counts = " / ".join(str(lv["n_clusters"]) for lv in tree["levels"])
        typer.echo(f"cluster tree, coarse to fine: {counts} clusters (columns cluster_level_0.."
                   f"{len(tree['levels']) - 1}; the flat `cluster` column is level {tree['flat_level']})")
    for line in meta.get("warnings", []):
        typer.echo(f"warning: {line}", err=True)
    if meta["input"]["rejected"]:
        typer.echo(f"{meta['input']['rejected']} row(s) rejected: see {out}/assignments.parquet.rejects.jsonl")


def map_clusters(
    clusters: Path = typer.Argument(..., help="A folder written by `curate cluster`."),
    taxonomy: Path | None = typer.Option(None, "--taxonomy", help="Taxonomy folder (default: shipped)."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output folder (default: the clusters folder)."),
    embedder: str | None = typer.Option(None, "--embedder", help="Embedder for node texts (default: the run's)."),
    min_similarity: float = typer.Option(0.4, "--min-similarity", callback=number(-1.0, 1.0),
                                         help="Below this centroid-to-node cosine (-1 to 1) a cluster fits no node."),
    min_share: float = typer.Option(0.5, "--min-share", callback=number(0.0, 1.0),
                                    help="Below this share (0 to 1) of rows labelled with the best node, no fit."),
) -> None:
    """Link each cluster to its best taxonomy node(s) and the tree's branch level to branches; unmatched clusters
    become proposed nodes."""

    mapping, proposed, written = map_folder(clusters, taxonomy, out, embedder=embedder,
                                            min_score={"similarity": min_similarity, "label_majority": min_share})
    names = json.loads(written["mapping"].read_text(encoding="utf-8"))["clusters"]
    for link, entry in zip(mapping.links, names, strict=True):
        best = f"{link.best[0]} ({link.best[1]:.2f}, {link.method})" if link.best else "-"
        fit = "" if link.fits else "  [no fit: its rows are not about it]" if link.unfocused else "  [no fit]"
        typer.echo(f"cluster {link.cluster:>3} ({link.size:>5} rows): {best}{fit}"
                   f" · {clean_text(entry.get('name', ''), 120)}")
    agree = mapping.agreement
    if "ari" in agree:
        typer.echo(f"clusters vs nodes on {agree['rows_with_node']} labelled rows: ARI {agree['ari']:.3f}, "
                   f"NMI {agree['nmi']:.3f}")
    tree = json.loads(written["mapping"].read_text(encoding="utf-8")).get("tree") or {}
    top = tree.get("branch_level") or {}
    if top.get("clusters"):
        links = ", ".join(f"{c['cluster']} -> {clean_text(c['branch'], 40)} ({c['score']:.2f}"
                          f"{'' if c['fits'] else ', no fit'})" for c in top["clusters"][:12])
        scored = f"; ARI vs branches {top['ari']:.3f} (n = {top['n']})" if top.get("ari") is not None else ""
        typer.echo(f"tree level {top['level']} ({top['n_clusters']} clusters) vs the taxonomy's branches: "
                   f"{links}{scored}")
    typer.echo(f"wrote {written['mapping']}" + (f" and {written['map']} (coloured by mapped node)"
                                                 if "map" in written else ""))
    if proposed:
        typer.echo(f"{len(proposed)} proposed node(s) in {written['proposals']} "
                   "(copy into a taxonomy folder, then `refusal-atlas taxonomy accept ID`)")


def register(app: typer.Typer) -> None:
    """Add `cluster` and `map` to the `curate` sub-app."""
    app.command("cluster")(cluster)
    app.command("map")(map_clusters)
