"""`curate map` on a clusters folder: map its clusters to taxonomy nodes, then propose nodes for the rest.

mapping.json holds the links, the agreement figures and, under `review`, each proposal's evidence
and each unmatched cluster that was not proposed with its reason (see `proposals`).
"""

from __future__ import annotations

from pathlib import Path

from refusal_atlas.curation.cluster_store import load_run
from refusal_atlas.curation.embed import make_embedder
from refusal_atlas.curation.mapping import Mapping, map_clusters
from refusal_atlas.curation.proposals import review_clusters, write_proposals
from refusal_atlas.io import atomic_write_json
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Node

__all__ = ["map_folder"]


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
    written = {"mapping": atomic_write_json(out / "mapping.json", sort_keys=False, obj={
        "run_id": run.run_id, "clusters_folder": str(run.folder),
        "taxonomy": str(taxonomy_dir) if taxonomy_dir else "default", **mapping.to_dict(),
        "review": review.to_dict()})}
    target = out / "proposals.yaml"
    if review.proposals:
        written["proposals"] = write_proposals(target, review.proposals, run)
    else:
        target.unlink(missing_ok=True)
    return mapping, review.nodes, written
