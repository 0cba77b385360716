"""The causal experiments: cross-ablation, steering, wording vs detection, and conditions.

- `cross_ablation`: ablate node i's direction (also the pooled direction and each node's
  residual after the pooled direction is projected out) and measure refusal on every node j's
  held-out prompts, plus the harmless KL — "can the components be steered separately?"
- `steering`: add a node's direction to harmless prompts, layer by layer → induced refusal.
- `wording_vs_detection`: per layer, how well a linear probe tells the nodes apart (detection)
  beside how strongly each direction promotes refusal-opening tokens through the logit lens
  (wording) — where is the category detected, where is the refusal worded?
- `condition_table`: for nodes with condition rules, the projection onto the node's direction
  and the refusal rate under each condition value, with bootstrap CIs — does a condition move the
  representation, or only the output?
Every function returns a DataFrame; `save_table` and the `plot_*` helpers write files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import Position, position_label
from refusal_atlas.mechinterp.directions import Groups, directions_from_means, group_means
from refusal_atlas.mechinterp.interventions import Intervention, ablation, addition
from refusal_atlas.mechinterp.noise import bootstrap_weights
from refusal_atlas.mechinterp.scoring import (
    RefusalTokens,
    answered_mean,
    behaves_as_labelled,
    behaviour_mask,
    clean_logprobs,
    discover_refusal_tokens,
    kl_from_logprobs,
    next_token_logprobs,
    refusal_flags,
    refusal_logodds,
)

POOLED_LABEL = "@pooled"


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def discover_tokens(
    lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], *, max_new_tokens: int = 12,
    system: str | None = None, progress: bool = False,
) -> tuple[RefusalTokens, np.ndarray, np.ndarray]:
    """Generate on harmful + harmless prompts, detect refusals, discover the refusal openers.

    Returns (tokens, refused flags of the harmful prompts, of the harmless prompts).
    """
    prompts = list(harmful) + list(harmless)
    responses = generate(lm, prompts, max_new_tokens=max_new_tokens, system=system, progress=progress,
                         desc="refusal tokens")
    refused, _ = refusal_flags(responses, prompts)
    tokens = discover_refusal_tokens(lm, prompts, responses, refused, system=system)
    return tokens, refused[: len(harmful)], refused[len(harmful):]


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (NaN for fewer than two values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def first_token_scores(lm, prompts, ids, intervention=None, batch_size=16, system=None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(refusal log-odds, does the greedy first token open a refusal) per prompt: one forward pass, no generation."""
    logp = next_token_logprobs(lm, prompts, intervention=intervention, batch_size=batch_size, system=system)
    odds = refusal_logodds(logp, ids)
    first = np.isin(logp.argmax(-1).numpy(), np.asarray(ids))
    return odds, first


def _marker_rate(lm, prompts, intervention, max_new_tokens, batch_size, system) -> np.ndarray:
    responses = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system,
                         hooks=intervention, progress=False)
    return refusal_flags(responses, prompts)[0]


def save_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Parquet (or CSV by suffix), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".csv":
        df.to_csv(tmp, index=False)
    else:
        df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Cross-ablation
# --------------------------------------------------------------------------------------------


def cross_ablation(
    lm: LoadedModel,
    directions,
    eval_sets: dict[str, Sequence[str]],
    harmless: Sequence[str],
    tokens: RefusalTokens | Sequence[int],
    *,
    layer: int,
    position: Position,
    sources: Sequence[str] | None = None,
    methods: Sequence[str] = ("diff_means", "residual"),
    include_pooled: bool = True,
    generate_rates: bool = False,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = True,
    ablation_layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per (ablated source, method, target node): refusal on the target's prompts + harmless KL.
    Each direction is ablated in every layer, or in `ablation_layers`.

    The source "none" is the un-ablated baseline. Refusal is measured by the logit score (mean
    log-odds), the share of prompts whose greedy first token opens a refusal, and — with
    `generate_rates` — the marker detector's rate on short generations.
    """
    ids = tokens.ids if isinstance(tokens, RefusalTokens) else list(tokens)
    targets = [t for t, p in eval_sets.items() if len(p)]
    if not targets:
        raise AtlasError("cross-ablation: no target node has evaluation prompts")
    flat = [p for t in targets for p in eval_sets[t]]
    owner = np.array([t for t in targets for _ in eval_sets[t]])
    nodes = [s for s in (sources if sources is not None else directions.nodes) if s in directions.nodes]
    jobs: list[tuple[str, str, Intervention | None]] = [("none", "none", None)]
    if include_pooled:
        jobs.append((POOLED_LABEL, "diff_means",
                     ablation(lm.model, directions.get(POOLED_LABEL, layer, position), ablation_layers)))
    for method in methods:
        for node in nodes:
            vec = directions.get(node, layer, position, method)
            if float(vec.norm()) > 0:
                jobs.append((node, method, ablation(lm.model, vec, ablation_layers)))
    clean = clean_logprobs(lm, harmless, batch_size=batch_size, system=system)[0]
    harmless_refused = np.isin(clean.argmax(-1).numpy(), ids)  # KL counts the harmless prompts the model answers
    rows = []
    for source, method, intervention in tqdm(jobs, desc="cross-ablate", unit="ablation", disable=not progress,
                                             dynamic_ncols=True):
        odds, first = first_token_scores(lm, flat, ids, intervention, batch_size, system)
        marker = _marker_rate(lm, flat, intervention, max_new_tokens, batch_size, system) if generate_rates else None
        if intervention is None:
            kl = 0.0
        else:
            kl = answered_mean(kl_from_logprobs(clean, next_token_logprobs(
                lm, harmless, intervention=intervention, batch_size=batch_size, system=system)), harmless_refused)
        for target in targets:
            m = owner == target
            rows.append({"source": source, "method": method, "target": target, "n": int(m.sum()),
                         "logit_score": float(odds[m].mean()), "first_token_refusal_rate": float(first[m].mean()),
                         "refusal_rate": float(marker[m].mean()) if marker is not None else np.nan,
                         "harmless_kl": kl, "layer": layer, "position": position_label(position)})
    df = pd.DataFrame(rows)
    base = df[df["source"] == "none"].set_index("target")
    for col in ("logit_score", "first_token_refusal_rate", "refusal_rate"):
        df[f"{col}_baseline"] = df["target"].map(base[col])
    df["self"] = df["source"] == df["target"]
    return df


def cross_ablation_summary(df: pd.DataFrame, value: str = "first_token_refusal_rate") -> pd.DataFrame:
    """Per source and method: refusal left on its own node vs on the other nodes (and the KL)."""
    rows = []
    for (source, method), g in df[df["source"] != "none"].groupby(["source", "method"], sort=False):
        own = g[g["target"] == source][value]
        other = g[g["target"] != source][value]
        rows.append({"source": source, "method": method, "own": float(own.mean()) if len(own) else np.nan,
                     "others": float(other.mean()) if len(other) else np.nan,
                     "all": float(g[value].mean()), "harmless_kl": float(g["harmless_kl"].iloc[0])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Steering
# --------------------------------------------------------------------------------------------


def steering(
    lm: LoadedModel,
    directions,
    nodes: Sequence[str],
    harmless: Sequence[str],
    tokens: RefusalTokens | Sequence[int],
    *,
    layers: Sequence[int],
    position: Position,
    coeffs: Sequence[float] = (1.0,),
    method: str = "diff_means",
    at: str = "output",
    generate_rates: bool = True,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Add each node's direction (natural norm × coeff) at each layer on harmless prompts → induced refusal."""
    ids = tokens.ids if isinstance(tokens, RefusalTokens) else list(tokens)
    jobs = [(n, layer, c) for n in nodes for layer in layers for c in coeffs]
    base_odds, base_first = first_token_scores(lm, harmless, ids, None, batch_size, system)
    rows = []
    for node, layer, coeff in tqdm(jobs, desc="steer", unit="run", disable=not progress, dynamic_ncols=True):
        vec = directions.get(node, layer, position, method)
        add = addition(lm.model, vec, layer, coeff=coeff, at=at)
        odds, first = first_token_scores(lm, harmless, ids, add, batch_size, system)
        marker = _marker_rate(lm, harmless, add, max_new_tokens, batch_size, system) if generate_rates else None
        rows.append({"node": node, "layer": layer, "coeff": coeff, "position": position_label(position),
                     "method": method, "n": len(harmless), "norm": float(vec.norm()),
                     "logit_score": float(odds.mean()), "logit_score_baseline": float(base_odds.mean()),
                     "first_token_refusal_rate": float(first.mean()),
                     "first_token_refusal_rate_baseline": float(base_first.mean()),
                     "induced_refusal_rate": float(marker.mean()) if marker is not None else np.nan})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Wording vs detection
# --------------------------------------------------------------------------------------------


def wording_vs_detection(
    lm: LoadedModel,
    directions,
    acts,
    labels: Sequence[str],
    harmful: Sequence[bool],
    refusal_ids: Sequence[int],
    *,
    position: Position,
    nodes: Sequence[str] | None = None,
    wordings: dict[str, str] | None = None,
    shared_wording: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Per layer: node-identity probe accuracy (detection) and refusal-token promotion (wording).

    With `wordings` ({node: its refusal text}, e.g. from an organism), also how strongly each
    node's direction promotes the tokens of its *own* node-specific wording, against the mean over
    the other nodes' wordings (positive = the direction carries the node's wording).
    """
    from refusal_atlas.mechinterp.logit_lens import token_set_score, wording_tokens
    from refusal_atlas.mechinterp.probes import probe_accuracy

    probe = probe_accuracy(acts, labels, harmful, positions=[position], seed=seed)
    pi = acts.position_index(position)
    node_list = [n for n in (nodes or directions.nodes) if n in directions.nodes]
    own_tokens = {n: wording_tokens(lm, wordings[n], shared_wording) for n in node_list
                  if wordings and n in wordings and wordings[n] != shared_wording}
    rows = []
    for li, layer in enumerate(acts.layers):
        if layer not in directions.layers:
            continue
        refusal_z = []
        own_z = []
        for n in node_list:
            vec = directions.get(n, layer, position)
            if float(vec.norm()) == 0:
                continue
            refusal_z.append(token_set_score(lm, vec, refusal_ids))
            if own_tokens.get(n):
                others = [t for m, ts in own_tokens.items() if m != n for t in ts if t not in own_tokens[n]]
                own_z.append(token_set_score(lm, vec, own_tokens[n]) - token_set_score(lm, vec, sorted(set(others)))
                             if others else token_set_score(lm, vec, own_tokens[n]))
        pooled = directions.get(POOLED_LABEL, layer, position)
        rows.append({"layer": layer, "position": position_label(position),
                     "probe_accuracy": float(probe["accuracy"][li, pi]), "probe_chance": probe["chance"],
                     "refusal_token_z_mean": float(np.nanmean(refusal_z)) if refusal_z else np.nan,
                     "pooled_refusal_token_z": token_set_score(lm, pooled, refusal_ids),
                     "own_wording_z_mean": float(np.mean(own_z)) if own_z else np.nan,
                     "n_nodes": len(refusal_z)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------


def condition_table(
    lm: LoadedModel,
    directions,
    rows: pd.DataFrame,
    *,
    layer: int,
    position: Position,
    node_of: dict[str, str] | None = None,
    refused: Sequence[bool] | None = None,
    max_new_tokens: int = 12,
    batch_size: int = 16,
    system: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """For every (direction node, condition) in `rows`: projection on the node's direction and refusal rate.

    `rows` is a prompt table with `prompt`, `node`, `condition` ("" = unconditioned) and
    optionally `expected`/`category`. `node_of` maps a row's node to the direction it is read
    against (e.g. its taxonomy branch); by default the row's own node. Refusals come from
    `refused` (e.g. an organism's adherence table) or are generated here.
    """
    from refusal_atlas.lm.capture import capture_activations

    if rows.empty:
        raise AtlasError("condition table: no prompts")
    df = rows.reset_index(drop=True).copy()
    if refused is not None:
        if len(refused) != len(df):
            raise AtlasError(f"condition table: {len(refused)} refusal flags for {len(df)} prompts")
        df["refused"] = np.asarray(refused, dtype=bool)
    df["direction_node"] = df["node"].map(lambda n: (node_of or {}).get(n, n))
    df = df[df["direction_node"].isin(directions.nodes)].reset_index(drop=True)
    if df.empty:
        raise AtlasError("condition table: none of the prompts' nodes has a direction")
    acts = capture_activations(lm, list(df["prompt"]), layers=[layer], positions=[position], batch_size=batch_size,
                               system=system, progress=progress)
    x = acts.at(layer, position)  # [n, d]
    units = {n: directions.unit(n, layer, position) for n in df["direction_node"].unique()}
    pooled = directions.unit(POOLED_LABEL, layer, position)
    df["projection"] = [float(x[i] @ units[n]) for i, n in enumerate(df["direction_node"])]
    df["pooled_projection"] = (x @ pooled).numpy()
    if "refused" not in df:
        responses = generate(lm, list(df["prompt"]), max_new_tokens=max_new_tokens, batch_size=batch_size,
                             system=system, progress=progress, desc="conditions")
        df["refused"] = refusal_flags(responses, list(df["prompt"]))[0]
    out = []
    keys = ["direction_node", "condition"]
    for (node, cond), g in df.groupby(keys, sort=True):
        lo, hi = bootstrap_ci(g["projection"], n_boot, seed)
        rlo, rhi = bootstrap_ci(g["refused"].astype(float), n_boot, seed)
        out.append({"node": node, "condition": cond or "(none)", "n": len(g),
                    "expected": ",".join(sorted(set(g["expected"]))) if "expected" in g else "",
                    "category": ",".join(sorted(set(g["category"]))) if "category" in g else "",
                    "projection": float(g["projection"].mean()), "projection_ci_low": lo, "projection_ci_high": hi,
                    "pooled_projection": float(g["pooled_projection"].mean()),
                    "refusal_rate": float(g["refused"].mean()), "refusal_ci_low": rlo, "refusal_ci_high": rhi})
    table = pd.DataFrame(out)
    base = table[table["condition"] == "(none)"].set_index("node")
    table["projection_delta"] = table["projection"] - table["node"].map(base["projection"])
    table["refusal_delta"] = table["refusal_rate"] - table["node"].map(base["refusal_rate"])
    return table


def condition_summary(per_prompt_table: pd.DataFrame) -> pd.DataFrame:
    """Across nodes, per condition category (permitted / restricted / ...): mean deltas with CIs."""
    t = per_prompt_table[per_prompt_table["condition"] != "(none)"].dropna(subset=["projection_delta"])
    rows = []
    for cat, g in t.groupby("category"):
        lo, hi = bootstrap_ci(g["projection_delta"])
        rlo, rhi = bootstrap_ci(g["refusal_delta"].dropna())
        rows.append({"category": cat, "n_node_conditions": len(g),
                     "projection_delta": float(g["projection_delta"].mean()), "projection_delta_ci": (lo, hi),
                     "refusal_delta": float(g["refusal_delta"].mean()), "refusal_delta_ci": (rlo, rhi)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot_cross_ablation(df: pd.DataFrame, path: str | Path, value: str = "first_token_refusal_rate",
                        method: str = "diff_means") -> Path:
    """Heatmap: rows = ablated direction (baseline and pooled first), columns = target node."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = df[(df["method"] == method) | df["source"].isin(["none", POOLED_LABEL])]
    mat = sub.pivot_table(index="source", columns="target", values=value, aggfunc="mean", sort=False)
    order = [s for s in ["none", POOLED_LABEL] if s in mat.index] + [s for s in mat.index if s not in
                                                                      ("none", POOLED_LABEL)]
    mat = mat.loc[order]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * mat.shape[1], 1.2 + 0.35 * mat.shape[0]))
    im = ax.imshow(mat.values, cmap="viridis", aspect="auto", vmin=0 if "rate" in value else None,
                   vmax=1 if "rate" in value else None)
    ax.set_xticks(range(mat.shape[1]), mat.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(mat.shape[0]), [f"ablate {s}" if s != "none" else "no ablation" for s in mat.index],
                  fontsize=7)
    ax.set_xlabel("refusal measured on node")
    ax.set_title(f"cross-ablation ({method}): {value}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_steering(df: pd.DataFrame, path: str | Path, value: str = "induced_refusal_rate") -> Path:
    """Induced refusal by layer, one line per node."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = value if df[value].notna().any() else "first_token_refusal_rate"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for node, g in df.groupby("node"):
        g = g.sort_values("layer")
        ax.plot(g["layer"], g[col], marker="o", label=node, lw=2.5 if node == POOLED_LABEL else 1)
    ax.set_xlabel("layer")
    ax.set_ylabel(col)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = [
    "POOLED_LABEL",
    "bootstrap_ci",
    "condition_summary",
    "condition_table",
    "cross_ablation",
    "cross_ablation_summary",
    "discover_tokens",
    "plot_cross_ablation",
    "plot_steering",
    "save_table",
    "steering",
    "wording_vs_detection",
]


# --------------------------------------------------------------------------------------------
# From a prompt table to evaluation sets, and the whole causal stage in one call
# --------------------------------------------------------------------------------------------


def direction_node_of(node: str, direction_nodes: Sequence[str], taxonomy=None) -> str | None:
    """The direction a prompt's node is measured against: itself, else its nearest ancestor with one."""
    if node in direction_nodes:
        return node
    if taxonomy is not None and node in taxonomy.nodes:
        for anc in taxonomy.ancestors(node):
            if anc in direction_nodes:
                return anc
    return None


def eval_sets_from_table(
    df: pd.DataFrame,
    direction_nodes: Sequence[str],
    *,
    taxonomy=None,
    split: str | None = "heldout",
    categories: Sequence[str] | None = ("refuse",),
    expected: Sequence[str] | None = ("refuse",),
) -> tuple[dict[str, list[str]], list[str]]:
    """({direction node: its harmful unconditioned prompts}, harmless prompts) from a prompt table.

    Rows are filtered by `split` (when the table has that split), `category` (organism tables) or
    `expected` (prompt-set tables); harmless = harmful False and not an over-refusal probe.
    """
    t = df.copy()
    if split and "split" in t and (t["split"] == split).any():
        t = t[t["split"] == split]
    cond = t["condition"].fillna("") if "condition" in t else pd.Series([""] * len(t), index=t.index)
    t = t[cond == ""]
    harmful = t[t["harmful"].astype(bool)]
    if categories is not None and "category" in harmful:
        harmful = harmful[harmful["category"].isin(categories)]
    elif expected is not None and "expected" in harmful:
        harmful = harmful[harmful["expected"].isin(expected)]
    sets: dict[str, list[str]] = {}
    for prompt, node in zip(harmful["prompt"], harmful["node"], strict=True):
        target = direction_node_of(str(node), direction_nodes, taxonomy)
        if target is not None:
            sets.setdefault(target, []).append(prompt)
    not_harmful = t[~t["harmful"].astype(bool)]
    if "source" in not_harmful:
        not_harmful = not_harmful[not_harmful["source"] != "overrefusal"]
    return sets, list(not_harmful["prompt"])


def pooled_ablation_and_steering(
    lm: LoadedModel,
    directions,
    harmful_eval: Sequence[str],
    harmless_eval: Sequence[str],
    *,
    layer: int,
    position: Position,
    coeffs: Sequence[float] = (1.0,),
    max_new_tokens: int = 16,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = True,
    before: Sequence[bool] | None = None,
    harmless_before: Sequence[bool] | None = None,
    ablation_layers: Sequence[int] | None = None,
) -> dict:
    """The headline causal test (REFERENCE.md §5) with the pooled direction, measured by generation.

    Ablation (unit direction, every layer or `ablation_layers`) on harmful prompts: refusal before /
    after and the harmless KL (on the harmless prompts the model answers un-intervened); addition (raw
    mean difference × coeff at `layer`) on harmless prompts: induced refusal. With `ablation_layers`,
    the every-layer ablation (Arditi et al.'s) is reported beside it under `all_layers`.
    `before` / `harmless_before`: un-intervened refusal flags already generated for the same prompts
    with the same settings (e.g. by `discover_tokens`), so they are not generated twice.
    """
    vec = directions.get(POOLED_LABEL, layer, position)
    abl = ablation(lm.model, vec, ablation_layers)
    if before is not None and len(before) != len(harmful_eval):
        raise AtlasError(f"pooled test: {len(before)} baseline flags for {len(harmful_eval)} harmful prompts")
    if harmless_before is not None and len(harmless_before) != len(harmless_eval):
        raise AtlasError(f"pooled test: {len(harmless_before)} flags for {len(harmless_eval)} harmless prompts")
    before = (np.asarray(before, dtype=bool) if before is not None
              else _marker_rate(lm, harmful_eval, None, max_new_tokens, batch_size, system))
    after = _marker_rate(lm, harmful_eval, abl, max_new_tokens, batch_size, system)
    harmless_before = (np.asarray(harmless_before, dtype=bool) if harmless_before is not None
                       else _marker_rate(lm, harmless_eval, None, max_new_tokens, batch_size, system))
    clean = clean_logprobs(lm, harmless_eval, batch_size=batch_size, system=system)[0]
    kl_each = kl_from_logprobs(clean, next_token_logprobs(lm, harmless_eval, intervention=abl, batch_size=batch_size,
                                                          system=system))
    compared = {}
    if ablation_layers is not None:
        everywhere = ablation(lm.model, vec)
        kl_everywhere = kl_from_logprobs(clean, next_token_logprobs(lm, harmless_eval, intervention=everywhere,
                                                                    batch_size=batch_size, system=system))
        compared = {"all_layers": {
            "refusal_after": float(_marker_rate(lm, harmful_eval, everywhere, max_new_tokens, batch_size,
                                                system).mean()),
            "harmless_kl": answered_mean(kl_everywhere, harmless_before),
            "harmless_kl_all": float(kl_everywhere.mean())}}
    induced = {}
    for c in coeffs:
        rate = _marker_rate(lm, harmless_eval, addition(lm.model, vec, layer, coeff=c), max_new_tokens, batch_size,
                            system)
        induced[str(c)] = float(rate.mean())
    return {
        "layer": layer, "position": position_label(position), "n_harmful": len(harmful_eval),
        "n_harmless": len(harmless_eval), "direction_norm": float(vec.norm()),
        "refusal_before": float(before.mean()), "refusal_after": float(after.mean()),
        "harmless_refusal_before": float(harmless_before.mean()),
        # capability cost: on the harmless prompts the model answers (where it over-refuses, un-refusing is the
        # intended effect of the ablation, not a cost); over every harmless prompt and the median beside it
        "harmless_kl": answered_mean(kl_each, harmless_before),
        "harmless_kl_all": float(kl_each.mean()), "harmless_kl_median": float(np.median(kl_each)),
        "n_harmless_answered": int((~harmless_before).sum()),
        "induced_refusal_rate": induced[str(coeffs[0])], "induced_by_coeff": induced,
        "ablated_layers": "all" if ablation_layers is None else [int(la) for la in ablation_layers], **compared,
    }


def _direction_groups(acts, nodes: Sequence[str], harmful: Sequence[bool], strata: Sequence[str] | None,
                      layer: int, position: Position, what: str) -> tuple[torch.Tensor, Groups]:
    """(activations [n, d] at layer/position in float32, their groups) of the direction prompts, grouped as
    the directions stage grouped them (harmless baseline matched on `strata` where given)."""
    harm = np.asarray(harmful, dtype=bool)
    if not harm.any() or harm.all():
        raise AtlasError(f"{what}: need harmful and harmless direction prompts")
    x = acts.acts[:, acts.layer_index(layer), acts.position_index(position)].float()
    return x, Groups.from_labels(list(nodes), harm.tolist(), strata=strata)


def ablation_stability(
    lm: LoadedModel,
    acts,
    nodes: Sequence[str],
    harmful: Sequence[bool],
    harmful_eval: Sequence[str],
    tokens: RefusalTokens | Sequence[int],
    *,
    layer: int,
    position: Position,
    strata: Sequence[str] | None = None,
    ablation_layers: Sequence[int] | None = None,
    n_boot: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    system: str | None = None,
) -> pd.DataFrame:
    """How much the pooled ablation depends on which prompts the direction was computed from.

    The pooled direction (as `compute_directions` builds it, with the same `strata`) is recomputed
    from `n_boot` bootstrap resamples of the direction prompts (within each node and harmless group)
    and ablated in every layer; each row gives first-token refusal and mean refusal log-odds on
    `harmful_eval`, and the resample's cosine to the full-sample direction (row `resample` -1).
    Why: a headline measured with one direction estimate can sit at a tipping point — on the default
    organism, unmatched resamples with cosine 0.96 to each other left 0.11-0.33 refusal (session 5).
    """
    ids = tokens.ids if isinstance(tokens, RefusalTokens) else list(tokens)
    x, groups = _direction_groups(acts, nodes, harmful, strata, layer, position, "ablation stability")
    full = directions_from_means(group_means(x, groups), groups)["diff_means"][0, -1]
    weights = bootstrap_weights(groups, n_boot, torch.Generator().manual_seed(seed))
    resampled = directions_from_means(group_means(x, groups, weights), groups)["diff_means"][:, -1]
    rows = []
    for b, vec in enumerate([full, *resampled], start=-1):
        odds, first = first_token_scores(lm, harmful_eval, ids, ablation(lm.model, vec, ablation_layers), batch_size,
                                         system)
        rows.append({"resample": b, "layer": layer, "position": position_label(position), "n": len(harmful_eval),
                     "first_token_refusal_rate": float(first.mean()), "logit_score": float(odds.mean()),
                     "cosine_to_full": float(torch.nn.functional.cosine_similarity(vec, full, dim=0))})
    return pd.DataFrame(rows)


def cone_ablation(
    lm: LoadedModel,
    acts,
    nodes: Sequence[str],
    harmful: Sequence[bool],
    harmful_eval: Sequence[str],
    harmless_eval: Sequence[str],
    tokens: RefusalTokens | Sequence[int],
    *,
    layer: int,
    position: Position,
    strata: Sequence[str] | None = None,
    ablation_layers: Sequence[int] | None = None,
    max_extra: int = 2,
    batch_size: int = 16,
    system: str | None = None,
) -> pd.DataFrame:
    """Is refusal one direction or a cone? Ablate the pooled direction plus the first k principal axes of the
    node directions' residuals (each node's difference of means minus its pooled component), k = 0..max_extra.

    One row per k: first-token refusal and mean refusal log-odds on `harmful_eval`, harmless KL (prompts
    the model answers), the k-th residual singular value, and each node's loading on that axis. Why: on the
    default organism the unmatched pooled direction alone left 0.19 first-token refusal and one more axis
    0.06 — what "several sintered components" would look like in numbers (cf. Wollschläger et al.'s refusal
    cones); much of that axis was the harmful sets' request form (see `request_form.py`).
    """
    ids = tokens.ids if isinstance(tokens, RefusalTokens) else list(tokens)
    x, groups = _direction_groups(acts, nodes, harmful, strata, layer, position, "cone ablation")
    names = groups.node_ids
    if len(names) < 2:
        raise AtlasError("cone ablation: need harmful prompts of at least 2 nodes")
    diffs = directions_from_means(group_means(x, groups), groups)["diff_means"][0]  # [K+1, d], pooled last
    per_node, pooled = diffs[:-1], diffs[-1]
    u = pooled / pooled.norm()
    residual = per_node - (per_node @ u)[:, None] * u[None]
    _, sing, axes = torch.linalg.svd(residual, full_matrices=False)
    clean = clean_logprobs(lm, harmless_eval, batch_size=batch_size, system=system)[0]
    answered_refused = np.isin(clean.argmax(-1).numpy(), ids)
    rows = []
    for k in range(min(max_extra, len(names) - 1) + 1):
        basis = torch.cat([u[None], axes[:k]]) if k else u[None]
        abl = ablation(lm.model, basis, ablation_layers)
        odds, first = first_token_scores(lm, harmful_eval, ids, abl, batch_size, system)
        kl = kl_from_logprobs(clean, next_token_logprobs(lm, harmless_eval, intervention=abl, batch_size=batch_size,
                                                          system=system))
        row = {"extra_axes": k, "layer": layer, "position": position_label(position), "n": len(harmful_eval),
               "first_token_refusal_rate": float(first.mean()), "logit_score": float(odds.mean()),
               "harmless_kl": answered_mean(kl, answered_refused),
               "singular_value": float(sing[k - 1]) if k else float("nan")}
        if k:
            row.update({f"loading:{n}": float(r @ axes[k - 1]) for n, r in zip(names, residual, strict=True)})
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The whole causal suite on an organism (what `run` and `organism test` call)
# --------------------------------------------------------------------------------------------


def causal_suite(
    organism_dir: str | Path,
    out_dir: str | Path,
    *,
    level: str = "root",
    positions: Sequence[Position] = (-1, -2, -3, -4, -5),
    select_layers: int | None = None,
    n_val: int = 16,
    coeffs: Sequence[float] = (1.0,),
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = True,
    refusal_tokens: Sequence[int] | None = None,
) -> dict:
    """Directions → selection → pooled ablation / addition → cross-ablation → steering by layer →
    wording vs detection → conditions, on an organism folder; writes tables + figures, returns metrics.

    Directions are extracted from the organism's `train` and `extra` prompts (never the held-out
    ones) with labels at the `level` of the taxonomy ("root": each node's branch, so every label
    has several prompts; "node": the nodes themselves). Evaluation uses the held-out split.
    The pooled direction is selected as `run` selects it (`selection.candidate_layers`, narrower
    ablation scopes, the same tiers); `select_layers` = N instead spreads N candidate layers evenly.
    """
    import json
    import time

    from refusal_atlas.lm.capture import capture_activations
    from refusal_atlas.lm.models import load_model
    from refusal_atlas.mechinterp.causal.selection import candidate_layers, default_ablation_starts, select_direction
    from refusal_atlas.mechinterp.directions import compute_directions
    from refusal_atlas.mechinterp.interventions import layer_subset
    from refusal_atlas.mechinterp.logit_lens import lens_table
    from refusal_atlas.mechinterp.request_form import request_forms
    from refusal_atlas.organism.core import load_organism, node_root
    from refusal_atlas.taxonomy.loader import load_taxonomy

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    org = load_organism(organism_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(org.model_dir)
    rows = org.prompts()
    tax = load_taxonomy(None)
    if any(n and n not in tax.nodes for n in rows["node"]):
        tax = None  # the organism was built from another taxonomy: no branch mapping

    def label(node: str) -> str:
        if not node:
            return ""
        return node_root(tax, node) if level == "root" and tax is not None else node

    # 1. directions from train + extra prompts (unconditioned; harmful ones the policy refuses)
    src = rows[rows["split"].isin(["train", "extra"]) & (rows["condition"] == "")]
    src = src[(~src["harmful"]) | (src["category"] == "refuse")]
    src = src[src["source"] != "overrefusal"]
    labels = [label(n) if h else "" for n, h in zip(src["node"], src["harmful"], strict=True)]
    counts = pd.Series([x for x in labels if x]).value_counts()
    keep = [(not h) or counts.get(lab, 0) >= 2 for lab, h in zip(labels, src["harmful"], strict=True)]
    src = src[keep].reset_index(drop=True)
    labels = [lab for lab, k in zip(labels, keep, strict=True) if k]
    t = time.perf_counter()
    # Arditi et al.: only prompts that behave as labelled (harmful refused, harmless answered) — per label,
    # where at least 2 do; a label the model never refuses keeps its prompts (its direction contrasts topics)
    behaves, _ = behaves_as_labelled(lm, list(src["prompt"]), list(src["harmful"].astype(bool)), max_new_tokens=8,
                                     batch_size=batch_size, progress=progress)
    keep, _ = behaviour_mask(behaves, labels, min_keep=2)
    src = src[keep].reset_index(drop=True)
    labels = [lab for lab, k in zip(labels, keep, strict=True) if k]
    harmful_flags = list(src["harmful"].astype(bool))
    acts = capture_activations(lm, list(src["prompt"]), layers=None, positions=list(positions),
                               batch_size=batch_size, out_dir=out / "directions" / "activations", progress=progress)
    ds = compute_directions(acts, labels, harmful_flags, meta={"organism": str(organism_dir), "level": level},
                            strata=request_forms(src["prompt"]))
    ds.save(out / "directions")
    (out / "directions" / "labels.json").write_text(json.dumps(
        {"prompts": list(src["prompt"]), "nodes": labels, "harmful": harmful_flags}))
    timings["directions"] = time.perf_counter() - t

    # 2. refusal tokens from the organism's own replies on training prompts
    t = time.perf_counter()
    train = rows[rows["split"] == "train"]
    tr_harm = list(train[(train["category"] == "refuse") & (train["condition"] == "")]["prompt"])[:24]
    tr_harmless = list(train[train["category"] == "harmless"]["prompt"])[:24]
    if refusal_tokens is not None:  # given (e.g. a model that never refuses, in tests)
        ids = list(refusal_tokens)
        tokens = RefusalTokens(ids, [lm.tokenizer.decode([i]) for i in ids], [], [], float("nan"), 0, 0)
    else:
        tokens, _, _ = discover_tokens(lm, tr_harm, tr_harmless, progress=progress)
    (out / "refusal_tokens.json").write_text(json.dumps(tokens.to_dict(), indent=1))
    timings["tokens"] = time.perf_counter() - t

    # 3. select the pooled direction's (layer, position)
    t = time.perf_counter()
    grid = candidate_layers(lm.n_layers) if select_layers is None else layer_subset(lm.n_layers, select_layers, 0.8)
    val_harm = list(src[src["harmful"]]["prompt"])[:n_val]
    val_harmless = list(src[~src["harmful"]]["prompt"])[:n_val]
    cand_pos = list(positions)[:2]
    saved = out / "selection_scores.parquet"
    previous = pd.read_parquet(saved) if saved.is_file() and (out / "selection.json").is_file() else None
    starts = default_ablation_starts(lm.n_layers)
    if previous is not None and sorted(set(previous["layer"])) == sorted(grid) and \
            sorted(set(previous["position"])) == sorted(position_label(p) for p in cand_pos) and \
            "ablate_from" in previous and set(previous["ablate_from"]) - {0} <= set(starts):
        # resume: the scores were computed by an earlier run on the same directions, with scopes
        from refusal_atlas.mechinterp.causal.selection import Selection, choose

        table, lay, lab, passed = choose(previous)
        old = json.loads((out / "selection.json").read_text()).get("pooled", {})
        sel = Selection(POOLED_LABEL, lay, cand_pos[[position_label(p) for p in cand_pos].index(lab)], passed,
                        table, old.get("baseline", {}), int(table.loc[table["chosen"], "ablate_from"].iloc[0]),
                        lm.n_layers)
    else:
        sel = select_direction(lm, ds, POOLED_LABEL, val_harm, val_harmless, tokens, layers=grid,
                               positions=cand_pos, ablation_starts=starts, batch_size=batch_size, progress=progress)
    save_table(sel.scores, saved)
    (out / "selection.json").write_text(json.dumps({"pooled": sel.to_dict()}, indent=1, default=str))
    timings["select"] = time.perf_counter() - t

    # 4. the headline: pooled ablation and addition on held-out prompts
    t = time.perf_counter()
    _, harmless_eval = eval_sets_from_table(rows, ds.nodes, taxonomy=tax, split="heldout")
    held = rows[(rows["split"] == "heldout") & (rows["category"] == "refuse") & (rows["condition"] == "")]
    headline = pooled_ablation_and_steering(lm, ds, list(held["prompt"]), harmless_eval, layer=sel.layer,
                                            position=sel.position, coeffs=coeffs, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, progress=progress,
                                            ablation_layers=sel.ablation_layers)
    timings["headline"] = time.perf_counter() - t
    (out / "headline.json").write_text(json.dumps(headline, indent=1, default=str))  # early: the key result

    # 5. cross-ablation between labels (node or branch directions, their residuals, the pooled one)
    t = time.perf_counter()
    held_sets = {label(n): [] for n in held["node"]}
    for p, n in zip(held["prompt"], held["node"], strict=True):
        held_sets[label(n)].append(p)
    held_sets = {k: v for k, v in held_sets.items() if k in ds.nodes}
    cross = cross_ablation(lm, ds, held_sets, harmless_eval, tokens, layer=sel.layer, position=sel.position,
                           batch_size=batch_size, progress=progress, ablation_layers=sel.ablation_layers)
    save_table(cross, out / "cross_ablation.parquet")
    summary = cross_ablation_summary(cross)
    save_table(summary, out / "cross_ablation_summary.csv")
    plot_cross_ablation(cross, out / "cross_ablation.png")
    timings["cross_ablation"] = time.perf_counter() - t

    # 6. steering by layer (pooled direction, first-token refusal; headline rate is generated above)
    t = time.perf_counter()
    steer = steering(lm, ds, [POOLED_LABEL], harmless_eval, tokens, layers=grid, position=sel.position,
                     generate_rates=False, batch_size=batch_size, progress=progress)
    save_table(steer, out / "steering.parquet")
    plot_steering(steer, out / "steering.png")
    timings["steering"] = time.perf_counter() - t

    # 7. wording vs detection
    t = time.perf_counter()
    info = org.info
    shared = info.get("wording", {}).get("shared")
    wordings: dict[str, str] = {}
    for n, p in info.get("policy", {}).items():  # a branch's wording: its nodes' own wordings together
        if p.get("refusal_text") and p["refusal_text"] != shared and label(n) in ds.nodes:
            wordings[label(n)] = (wordings.get(label(n), "") + " " + p["refusal_text"]).strip()
    wording = wording_vs_detection(lm, ds, acts, labels, harmful_flags, tokens.ids, position=sel.position,
                                   wordings=wordings or None, shared_wording=shared)
    save_table(wording, out / "wording_vs_detection.parquet")
    top, lens_scores = lens_table(lm, ds, [POOLED_LABEL, *ds.nodes], sel.position, layers=grid,
                                  refusal_ids=tokens.ids)
    save_table(top, out / "logit_lens_tokens.parquet")
    save_table(lens_scores, out / "logit_lens_scores.parquet")
    timings["wording"] = time.perf_counter() - t

    # 8. conditions: held-out framed prompts vs their unconditioned originals (organism's refusal flags)
    t = time.perf_counter()
    adh = org.adherence
    cond_rows = adh[adh["harmful"].astype(bool)]
    with_rules = set(cond_rows.loc[cond_rows["condition"] != "", "node"])
    cond_rows = cond_rows[cond_rows["node"].isin(with_rules)].reset_index(drop=True)
    node_of = {n: label(n) for n in cond_rows["node"].unique() if label(n) in ds.nodes}
    conditions = condition_table(lm, ds, cond_rows.drop(columns=["refused"]), layer=sel.layer,
                                 position=sel.position, node_of=node_of, refused=list(cond_rows["refused"]),
                                 batch_size=batch_size, progress=progress)
    save_table(conditions, out / "conditions.parquet")
    cond_summary = condition_summary(conditions)
    save_table(cond_summary.astype({"projection_delta_ci": str, "refusal_delta_ci": str}),
               out / "conditions_summary.csv")
    timings["conditions"] = time.perf_counter() - t

    pooled_rows = summary[summary["source"] == POOLED_LABEL]
    metrics = {
        "ablation": {**{k: headline[k] for k in ("refusal_before", "refusal_after", "harmless_kl", "layer",
                                                 "position", "n_harmful", "n_harmless")},
                     "ablate_from": sel.ablate_from, **({"all_layers": headline["all_layers"]}
                                                        if "all_layers" in headline else {})},
        "steering": {"induced_refusal_rate": headline["induced_refusal_rate"],
                     "induced_by_coeff": headline["induced_by_coeff"],
                     "harmless_refusal_before": headline["harmless_refusal_before"]},
        "selection": sel.to_dict(),
        "refusal_tokens": tokens.tokens,
        "cross_ablation": {
            "pooled_first_token_refusal": float(pooled_rows["all"].iloc[0]) if len(pooled_rows) else None,
            "own_vs_others": summary[summary["source"] != POOLED_LABEL].to_dict("records"),
        },
        "conditions": cond_summary.to_dict("records"),
        "timings": {**timings, "total": time.perf_counter() - t0},
    }
    tmp = out / f".causal.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(metrics, indent=1, default=str))
    os.replace(tmp, out / "causal.json")
    return metrics
