"""The `wording` stage of `run`: the planted-wording known answer on the requests it was planted on.

The organism is taught one refusal wording per node on every other branch ("… I don't assist with <label>.")
and one shared sentence elsewhere (`organism.policy.wording_groups`). The cluster stage scores its refusal
clusters against those groups on the run's *evaluation* requests, where the taught group follows the request's
benchmark category through the crosswalk rather than its text, so that figure mixes the clustering with how far
a 135M model generalises a category it cannot read off the request (docs/decisions.md). This stage asks the
known-answer question where the answer is planted: the organism's replies to its own unconditioned training
refusals (refuse and redirect rows), collected, put through the run's detector, clustered as the cluster stage
clusters replies, and scored against the wording taught for each request (`pipeline_cluster.wording_scores`:
ARI at the tree level closest to the number of groups, the exact-text ceiling, and adherence, each with its n).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.pipeline_cluster import responses_config, wording_scores
from refusal_atlas.curation.backends import GenerationSettings, TransformersBackend
from refusal_atlas.curation.cluster_run import cluster_corpus
from refusal_atlas.curation.collect import collect
from refusal_atlas.curation.detect import DEFAULT_DETECTOR, get_detector
from refusal_atlas.curation.tables import write_table
from refusal_atlas.lm.models import LoadedModel

# Bump when the stage's record changes (a resumed run then recomputes it).
STAGE_VERSION = 1
MIN_REFUSED = 10  # fewer refusals than this are not clustered (the cluster stage's own floor)


def taught_requests(organism_dir: Path) -> pd.DataFrame:
    """The organism's unconditioned training requests whose policy is a refusal (its wordings were planted on these)."""
    rows = pd.read_parquet(organism_dir / "prompts.parquet")
    keep = ((rows["split"] == "train") & (rows["condition"].astype(str) == "")
            & rows["expected"].isin(["refuse", "redirect"]))
    return rows.loc[keep, ["prompt_id", "prompt", "node", "expected", "category", "target"]].reset_index(drop=True)


def run(out: Path, lm: LoadedModel, *, seed: int, n_seeds: int, max_new_tokens: int, batch_size: int,
        progress: bool = False) -> dict[str, Any]:
    """Collect, detect, cluster and score the organism's replies to its taught refusals; the stage's record."""
    requests = taught_requests(out / schema.ORGANISM_DIR)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    replies = collect(requests, TransformersBackend(lm, progress=progress), out / schema.WORDING_RESPONSES.path,
                      settings=settings, overwrite=True)
    refused, _ = get_detector(DEFAULT_DETECTOR).predict(replies["response"].astype(str).tolist(),
                                                         replies["prompt"].astype(str).tolist())
    replies["refused"] = refused
    replies["detector"] = DEFAULT_DETECTOR
    write_table(replies, out / schema.WORDING_RESPONSES.path)
    result: dict[str, Any] = {"requests": len(replies), "refused": int(replies["refused"].sum()),
                              "detector": DEFAULT_DETECTOR}
    chosen = replies[replies["refused"].astype(bool)]
    if len(chosen) < MIN_REFUSED:
        result["note"] = f"{len(chosen)} refused replies: too few to cluster (at least {MIN_REFUSED})"
        return result
    refused_path = out / schema.WORDING_REFUSED
    write_table(chosen, refused_path)
    seeds = tuple(seed * 1000 + j for j in range(n_seeds))
    clustered = cluster_corpus(refused_path, out / schema.WORDING_CLUSTERS_DIR, text_column="response",
                               config=responses_config(len(chosen), seeds), stability_runs=0,
                               label_column="prompt", net_of_column=None)
    result["n_clusters"] = clustered.meta.get("n_clusters")
    scores = wording_scores(clustered, chosen, out / schema.ORGANISM_JSON.path)
    if scores is not None:
        result.update(scores)
    return result
