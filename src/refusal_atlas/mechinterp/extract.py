"""The `directions extract` stage as one library call: directions + noise floors + layer profiles.

`extract_directions` takes captured activations and per-prompt labels and returns a
`DirectionSet` whose metadata carries everything later stages read without the activations:
noise arrays (`noise.py`), held-out AUROC per node/layer/position and the node-identity probe
accuracy (`probes.py`), and the taxonomy's parent links (for the overlap graph's sibling test).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from refusal_atlas.lm.capture import Activations
from refusal_atlas.lm.positions import position_label
from refusal_atlas.mechinterp.directions import METHODS, ROLES, DirectionSet, Groups, compute_directions
from refusal_atlas.mechinterp.noise import noise_floor
from refusal_atlas.mechinterp.probes import auroc_profile, probe_accuracy


def extract_directions(
    acts: Activations,
    nodes: Sequence[str],
    harmful: Sequence[bool],
    *,
    methods: Sequence[str] = METHODS,
    n_splits: int = 50,
    n_boot: int = 200,
    n_perm: int = 100,
    seed: int = 0,
    profiles: bool = True,
    parents: dict[str, list[str]] | None = None,
    labels: dict[str, str] | None = None,
    n_model_layers: int | None = None,
    strata: Sequence[str] | None = None,
    progress: bool = False,
) -> DirectionSet:
    """Directions for every node/layer/position with noise floors and (optionally) layer profiles.

    `strata` (one label per prompt, e.g. `request_form.request_forms(prompts)`) matches each
    direction's harmless baseline on that covariate (`directions.Groups`); the noise floors use
    the same groups, so they describe the directions actually reported.
    """
    groups = Groups.from_labels(nodes, harmful, strata=strata)
    ds = compute_directions(acts, nodes, harmful, methods, strata=strata)
    ds.noise = noise_floor(acts, groups, methods=tuple(methods), n_splits=n_splits, n_boot=n_boot,
                           n_perm=n_perm, seed=seed, progress=progress)
    ds.meta["noise"] = {"n_splits": n_splits, "n_boot": n_boot, "n_perm": n_perm, "seed": seed,
                        "interval": "basic bootstrap 95%", "reliability": "Spearman-Brown of mean split-half cosine"}
    if n_model_layers is not None:
        ds.meta["n_model_layers"] = n_model_layers
    if parents is not None:
        ds.meta["taxonomy"] = {"parents": {k: list(v) for k, v in parents.items() if k in groups.nodes},
                               "labels": {k: v for k, v in (labels or {}).items() if k in groups.nodes}}
    if profiles:
        au = auroc_profile(acts, groups, seed=seed)
        ds.meta["auroc"] = {
            node: {position_label(p): [round(float(x), 4) for x in a[:, j]] for j, p in enumerate(acts.positions)}
            for node, a in au.items()
        }
        roles = [p for p in ROLES.values() if p in acts.positions]
        probe = probe_accuracy(acts, nodes, harmful, positions=roles or acts.positions[-1:], seed=seed)
        ds.meta["probe"] = {
            "accuracy": {position_label(p): [None if np.isnan(x) else round(float(x), 4)
                                             for x in probe["accuracy"][:, acts.position_index(p)]]
                         for p in (roles or acts.positions[-1:])},
            "chance": probe["chance"], "n": probe["n"], "classes": probe["classes"],
        }
    return ds


__all__ = ["DirectionSet", "extract_directions"]
