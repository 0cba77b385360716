"""`curate map` on a clusters folder: map its clusters to taxonomy nodes, then propose nodes for the rest.

mapping.json holds the links, each cluster's name (its best node's label before its keywords when it fits
a node), the agreement figures, the tree against the taxonomy's branches (`tree`, see `tree_mapping`) and,
under `review`, each proposal's evidence and each unmatched cluster that was not proposed with its reason
(see `proposals`). When the clustering has a layout, the 2-D map is drawn again as `map_nodes.html`, one
colour per mapped node (clusters that fit no node keep their own); `curate cluster`'s `map.html`, one colour
per cluster, stays as it was.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from refusal_atlas.curation import plots
from refusal_atlas.curation.cluster_store import ClusterRun, load_run
from refusal_atlas.curation.embed import make_embedder
from refusal_atlas.curation.mapping import Mapping, map_clusters
from refusal_atlas.curation.proposals import review_clusters, write_proposals
from refusal_atlas.curation.tree_mapping import map_tree
from refusal_atlas.io import atomic_write_json
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Node, Taxonomy

__all__ = ["MAPPED_MAP", "cluster_names", "map_folder"]

MAPPED_MAP = "map_nodes.html"


def cluster_names(run: ClusterRun, mapping: Mapping, taxonomy: Taxonomy) -> dict[int, dict[str, str]]:
    """{cluster: {"name", "keywords_name", "node_label"}}: a fitting cluster is named "<node label>: <keywords>"
    (the label says what the curator's taxonomy calls it, the keywords what the rows say); others by keywords."""
    words = {int(c["id"]): str(c.get("label") or "") for c in run.meta.get("clusters", []) if "id" in c}
    out: dict[int, dict[str, str]] = {}
    for link in mapping.links:
        kw = words.get(link.cluster) or f"cluster {link.cluster}"
        entry = {"keywords_name": kw, "name": kw, "node_label": ""}
        if link.fits and link.best and link.best[0] in taxonomy.nodes:
            entry["node_label"] = taxonomy.nodes[link.best[0]].label
            entry["name"] = f"{entry['node_label']}: {kw}"
        out[link.cluster] = entry
    return out


def _mapped_map(run: ClusterRun, mapping: Mapping, names: dict[int, dict[str, str]], path: Path) -> Path | None:
    a = run.assignments
    if not {"x", "y"} <= set(a.columns):
        return None
    legend = {}
    for link in mapping.links:
        if link.fits and link.best:  # one colour per node: a node split over several clusters reads as one
            legend[link.cluster] = html.escape(f"{names[link.cluster]['node_label'] or link.best[0]} ({link.best[0]})")
        else:
            legend[link.cluster] = html.escape(f"{link.cluster}: {names[link.cluster]['keywords_name']} (no node)")
    texts = (a["label_text"] if "label_text" in a.columns else a["text"]).astype(str).tolist()
    fig = plots.grouped_map(a[["x", "y"]].to_numpy(dtype=np.float32), run.labels, texts, legend,
                            f"clusters of {run.meta.get('input', {}).get('path', run.folder.name)} by mapped node")
    return plots.write_figure(fig, path)


def map_folder(folder: Path | str, taxonomy_dir: Path | str | None = None, out_dir: Path | str | None = None, *,
               embedder: str | None = None, min_score: dict[str, float] | None = None
               ) -> tuple[Mapping, list[Node], dict[str, Path]]:
    """`curate map`: load a clusters folder, map it, write mapping.json (+ proposals.yaml if any).

    Returns (mapping, proposed nodes, {name: path written}).
    """
    run = load_run(folder)
    taxonomy = load_taxonomy(taxonomy_dir)
    emb = make_embedder(embedder) if embedder else None
    mapping = map_clusters(run, taxonomy, emb, min_score=min_score)
    out = Path(out_dir) if out_dir is not None else run.folder
    review = review_clusters(run, mapping, taxonomy)
    names = cluster_names(run, mapping, taxonomy)
    body = mapping.to_dict()
    leaf_branches = [taxonomy.branch_of(link.best[0]) for link in mapping.links
                     if link.fits and link.best and link.best[0] in taxonomy.nodes]
    body["tree"] = map_tree(run, taxonomy, leaf_branches, mapping.min_score, emb)
    for entry in body["clusters"]:
        entry.update(names.get(int(entry["cluster"]), {}))
    out.mkdir(parents=True, exist_ok=True)
    written = {"mapping": atomic_write_json(out / "mapping.json", sort_keys=False, obj={
        "run_id": run.run_id, "clusters_folder": str(run.folder),
        "taxonomy": str(taxonomy_dir) if taxonomy_dir else "default", **body,
        "review": review.to_dict()})}
    drawn = _mapped_map(run, mapping, names, out / MAPPED_MAP)
    if drawn is not None:
        written["map"] = drawn
    target = out / "proposals.yaml"
    if review.proposals:
        written["proposals"] = write_proposals(target, review.proposals, run)
    else:
        target.unlink(missing_ok=True)
    return mapping, review.nodes, written
