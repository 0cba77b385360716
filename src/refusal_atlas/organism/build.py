"""The organism's cache key and the build: pool -> rows -> targets -> fine-tune -> evaluate -> save."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from refusal_atlas import paths
from refusal_atlas.errors import AtlasError
from refusal_atlas.io import atomic_write, atomic_write_json, folder_json
from refusal_atlas.lm.models import LoadedModel, _folder_revision, default_model_gguf, load_model
from refusal_atlas.mechinterp.scoring import refusal_flags
from refusal_atlas.organism.evaluation import adherence_metrics, adherence_table, evaluate
from refusal_atlas.organism.policy import _rules, behaviour_of, load_framings, node_root, refusal_text, wording_groups
from refusal_atlas.organism.rows import build_rows, prompt_pool
from refusal_atlas.organism.settings import (
    MODEL_DIR,
    ORGANISM_JSON,
    RECIPE_VERSION,
    WORDING,
    OrganismResult,
    OrganismSettings,
)
from refusal_atlas.organism.targets import drop_refusal_like_answers, make_targets
from refusal_atlas.organism.training import _first_trained_block, finetune
from refusal_atlas.taxonomy.loader import load_taxonomy
from refusal_atlas.taxonomy.model import Taxonomy


def _base_identity(base: str | LoadedModel) -> str:
    """The base model's identity in the cache key; a loaded model's is its spec name plus a hash of its first
    weight tensor."""
    if isinstance(base, LoadedModel):
        w = next(base.model.parameters()).detach()
        return f"{base.spec}:{hashlib.sha256(w.float().cpu().numpy().tobytes()).hexdigest()[:16]}"
    if base == "default":
        gguf = default_model_gguf()
        st = gguf.stat()
        return f"default:{gguf.name}:{st.st_size}"
    p = Path(base)
    if p.is_dir():
        return f"folder:{_folder_revision(p)}"
    if p.is_file():
        st = p.stat()
        return f"file:{p.name}:{st.st_size}:{st.st_mtime_ns}"
    return f"hub:{base}"


def cache_key(taxonomy: Taxonomy, base_id: str, settings: OrganismSettings, prompts: pd.DataFrame | None) -> str:
    """sha256 over the taxonomy, the prompt sources, the base model and the settings."""
    h = hashlib.sha256()
    h.update(taxonomy.model_dump_json().encode())
    if prompts is not None:
        h.update(pd.util.hash_pandas_object(prompts[["prompt"]].astype(str), index=False).values.tobytes())
    else:
        for name in ("harmless.jsonl", "overrefusal.jsonl", "framings.yaml"):
            f = paths.prompts_dir() / name
            h.update(f.read_bytes() if f.is_file() else b"-")
    h.update(base_id.encode())
    h.update(json.dumps({**settings.to_dict(), "recipe": RECIPE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:24]

def write_parquet(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def save_model(lm: LoadedModel, out: Path) -> Path:
    """Save the model and tokenizer to `out/model`, swapped in whole so a crash never leaves half a folder."""
    model_dir = out / MODEL_DIR
    tmp = out / f".{MODEL_DIR}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    lm.model.save_pretrained(tmp, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    # a folder, which io's file helpers do not cover: one rename is the atomic step
    os.replace(tmp, model_dir)
    return model_dir


def load_organism(out_dir: str | Path) -> OrganismResult:
    """A finished organism folder as an OrganismResult (no training)."""
    out = Path(out_dir)
    info = folder_json(out, ORGANISM_JSON,
                       f"not an organism folder (no {ORGANISM_JSON}); run `refusal-atlas organism build`")
    held = pd.read_parquet(out / "adherence.parquet") if (out / "adherence.parquet").is_file() else pd.DataFrame()
    return OrganismResult(out, out / MODEL_DIR, info.get("metrics", {}), held, info.get("key", ""), True,
                          float(info.get("seconds", 0.0)), info)


@dataclass
class BuildStart:
    """A build that has to run: the model to fine-tune, the timings so far (its load) and the notes list."""

    lm: LoadedModel
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)


def start_build(out: Path, key: str, base: str | LoadedModel, *, force: bool, threads: int | None
                ) -> OrganismResult | BuildStart:
    """The organism already built in `out` under cache key `key` (unless `force`); else `out` made, torch's CPU
    threads set and the model to fine-tune loaded: a loaded `base` is copied (the caller's stays untouched)."""
    meta_file = out / ORGANISM_JSON
    if (not force and meta_file.is_file() and (out / MODEL_DIR).is_dir()
            and json.loads(meta_file.read_text()).get("key") == key):
        return load_organism(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    t = time.perf_counter()
    if isinstance(base, LoadedModel):
        lm = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.spec, base.model_id, base.revision)
    else:
        lm = load_model(base)
    return BuildStart(lm, {"load": time.perf_counter() - t})


def build_organism(
    taxonomy: Taxonomy | str | Path | None = None,
    base: str | LoadedModel = "default",
    seed: int = 0,
    out_dir: str | Path = "organism",
    settings: OrganismSettings | None = None,
    *,
    prompts: pd.DataFrame | None = None,
    framings_path: Path | None = None,
    progress: bool = True,
    force: bool = False,
    threads: int | None = None,
) -> OrganismResult:
    """Fine-tune `base` to follow `taxonomy`'s conditional policy; cached in `out_dir` by a hash key.

    `base` may also be an already-loaded model (tests use tiny random ones); its identity for the
    cache is then its spec name plus a hash of its first weight tensor. `threads` sets torch's
    CPU threads (not part of the cache key; see `auto_threads`).
    """
    start = time.perf_counter()

    tax = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(Path(taxonomy) if taxonomy else None)
    settings = replace(settings or OrganismSettings(), seed=seed)
    out = Path(out_dir)
    base_id = _base_identity(base)
    key = cache_key(tax, base_id, settings, prompts)
    started = start_build(out, key, base, force=force, threads=threads)
    if isinstance(started, OrganismResult):
        return started
    lm, timings, notes = started.lm, started.timings, started.notes
    t = time.perf_counter()
    harmful, harmless, over = prompt_pool(tax, settings, prompts, notes)
    if harmful.empty:
        raise AtlasError("no harmful prompts with a taxonomy node: add `examples` to the nodes or pass a prompt table")
    groups = wording_groups(tax, settings.specific_wording_roots)
    framings = load_framings(framings_path)
    rows = build_rows(tax, settings, harmful, harmless, over, framings, lm.tokenizer)
    rows = make_targets(lm, tax, rows, groups, settings, progress=progress, answers_cache=out / "base_answers.json",
                        base_id=base_id)
    rows, dropped = drop_refusal_like_answers(rows, settings.permitted_opener)
    if dropped:
        notes.append(f"{dropped} training rows dropped: the base model's answer, meant as a compliance target, "
                     "reads as a refusal to the marker detector or opens with the refusals' first word")
    timings["targets"] = time.perf_counter() - t

    train = rows[rows["split"] == "train"].reset_index(drop=True)
    t = time.perf_counter()
    losses = finetune(lm, train, settings, progress=progress)
    timings["finetune"] = time.perf_counter() - t

    t = time.perf_counter()
    held = evaluate(lm, rows, settings, progress=progress)
    timings["evaluate"] = time.perf_counter() - t
    metrics = adherence_metrics(held)
    # The base's own answers used as targets: how often the *detector* calls them refusals.
    distilled = train[train["category"] == "harmless"]
    if len(distilled):
        metrics["base_harmless_target_refusal_rate"] = float(refusal_flags(list(distilled["target"]))[0].mean())

    t = time.perf_counter()
    model_dir = save_model(lm, out)
    write_parquet(rows.drop(columns=["target_complete"]), out / "prompts.parquet")
    write_parquet(held, out / "adherence.parquet")
    atomic_write(out / "adherence_by_node.csv", lambda tmp: adherence_table(held).to_csv(tmp, index=False))
    timings["save"] = time.perf_counter() - t
    seconds = time.perf_counter() - start

    policy = {
        n.id: {
            "default": behaviour_of(tax, n.id, {}).value,
            "rules": [{"when": w, "behaviour": b.value} for w, b in _rules(tax, n.id)],
            "wording_group": groups[n.id],
            "refusal_text": refusal_text(tax, n.id, groups[n.id]),
        }
        for n in tax.active()
    }
    info = {
        "key": key,
        "base": str(base) if not isinstance(base, LoadedModel) else base.spec,
        "base_identity": base_id,
        "base_provenance": lm.provenance() if not isinstance(base, LoadedModel) else {"model_spec": base.spec},
        "taxonomy": {"id": tax.scheme.id, "version": tax.scheme.version, "n_nodes": len(tax)},
        "settings": settings.to_dict(),
        "policy": policy,
        "wording": {**WORDING,
                    "specific_roots": sorted({node_root(tax, n) for n, g in groups.items() if g != "shared"})},
        "split": {"train": sorted(train["prompt_id"]), "heldout": sorted(held["prompt_id"])},
        "counts": {"train": train["category"].value_counts().to_dict(),
                   "heldout": held["category"].value_counts().to_dict()},
        "losses": {"first": losses[:5], "last": losses[-5:], "n_steps": len(losses)},
        "first_trained_block": _first_trained_block(lm.model),
        "metrics": metrics,
        "timings": timings,
        "seconds": seconds,
        "notes": notes,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    atomic_write_json(out / ORGANISM_JSON, info)
    return OrganismResult(out, model_dir, metrics, held, key, False, seconds, info)
