"""The `cluster` stage of `run`: bottom-up clusters of the corpus, their stability and their taxonomy links.

Two views of the same corpus: `clusters/` clusters the *prompts* of harmful rows (do bottom-up
groups of what was asked agree with the taxonomy's nodes? → node ARI/NMI, proposals), and
`clusters/responses/` clusters the *responses* the detector calls refusals (how many distinct
refusal wordings does the model use? — for the organism the truth is its wording groups).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.curation.cluster import ClusterConfig
from refusal_atlas.curation.cluster_run import cluster_corpus
from refusal_atlas.curation.map_folder import map_folder
from refusal_atlas.curation.tables import write_table
from refusal_atlas.taxonomy.model import Taxonomy


def run(out: Path, seed: int, n_seeds: int, taxonomy: Taxonomy) -> dict[str, Any]:
    """Cluster the harmful prompts (and the refusals, where there are enough), map them to the taxonomy."""
    corpus = pd.read_parquet(out / "corpus.parquet")
    seeds = tuple(seed * 1000 + j for j in range(n_seeds))
    harmful = corpus[corpus["harmful"].astype(bool)]
    harmful_path = out / "clusters" / "harmful_corpus.parquet"
    write_table(harmful, harmful_path)
    config = ClusterConfig(seeds=seeds, min_cluster_size=max(5, len(harmful) // 40))
    prompts_run = cluster_corpus(harmful_path, out / "clusters", text_column="prompt", config=config,
                                 stability_runs=n_seeds)
    mapping, proposed, _ = map_folder(out / "clusters", None)
    result: dict[str, Any] = {
        "text": "prompt", "n_rows": len(harmful), "n_clusters": prompts_run.meta.get("n_clusters"),
        "outlier_fraction": prompts_run.meta.get("outlier_fraction"),
        "seed_ari": (prompts_run.meta.get("stability") or {}).get("seed_pairwise_ari", {}).get("mean"),
        "node_ari": mapping.agreement.get("ari"), "node_nmi": mapping.agreement.get("nmi"),
        "proposals": len(proposed),
    }
    refused = corpus[corpus["refused"].astype(bool)]
    if len(refused) >= 10:
        refused_path = out / "clusters" / "responses" / "refused_corpus.parquet"
        write_table(refused, refused_path)
        small = ClusterConfig(seeds=seeds, min_cluster_size=max(3, len(refused) // 40), layout_2d=False)
        responses_run = cluster_corpus(refused_path, out / "clusters" / "responses", text_column="response",
                                       config=small, stability_runs=0)
        result["responses"] = {"n_rows": len(refused), "n_clusters": responses_run.meta.get("n_clusters"),
                               "outlier_fraction": responses_run.meta.get("outlier_fraction")}
    return result
