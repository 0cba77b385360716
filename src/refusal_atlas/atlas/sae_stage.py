"""The `sae` stage of `run`: train an SAE on the run's chat activations, then per-node features.

Steps (each writes into `<out>/sae/`; the capture and the training are skipped on a rerun when their
files were written from the same inputs, `inputs.json` holding that key):
1. tokens: every prompt set of the run (harmful, harmless, over-refusal, condition framings, plus
   any model answers given), chat-formatted, block `layer`'s output at every token from the
   instruction on, capped at `max_tokens` → `tokens.safetensors`;
2. train a TopK SAE (`width`, `k`) → `model/` (SAELens format) + `model/training.json`;
3. per node: candidates by decoder cosine to the node's refusal direction and to the pooled refusal
   direction (`candidates`), K* by attribution over the node's selection prompts → `features.parquet`,
   `attributions.safetensors`;
4. clamp each node's K* latents (× `clamp_factor`, error term kept) and, for comparison, ablate the
   node's direction at every layer; first-token refusal on every node's held-out prompts and
   harmless KL → `clamp.parquet` (the cross-clamp matrix);
5. Jaccard of the K* sets with a bootstrap floor → `jaccard.parquet`, `shared.parquet`;
then `sae.json`: the figures, each step's seconds and the weights' sha256.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from refusal_atlas.atlas import schema
from refusal_atlas.atlas.stages import stable_hash
from refusal_atlas.errors import AtlasError
from refusal_atlas.hashing import file_sha256, text_sha256
from refusal_atlas.io import atomic_write, atomic_write_json
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.lm.positions import post_instruction_positions
from refusal_atlas.mechinterp.interventions import ablation
from refusal_atlas.mechinterp.sae import load_sae
from refusal_atlas.mechinterp.sae.clamp import clamp
from refusal_atlas.mechinterp.sae.data import open_activations
from refusal_atlas.mechinterp.sae.features import (
    attributions,
    candidate_pool,
    feature_table,
    latent_stats,
    select,
)
from refusal_atlas.mechinterp.sae.overlap import feature_overlap, shared_and_specific
from refusal_atlas.mechinterp.sae.tokens import TokenActivations, capture_tokens, concat
from refusal_atlas.mechinterp.sae.train import TRAINING_JSON, TrainSettings, train_sae
from refusal_atlas.mechinterp.scoring import answered_mean, kl_from_logprobs, next_token_logprobs, refusal_logodds

STAGE_VERSION = 3  # bump when a code change alters what the stage measures (its folder is then redone)
CANDIDATE_SOURCES = ("node", "node+refusal")
POOLED_KEY = "\x00pooled"  # the pooled direction's entry in the inputs key (no node can be named so)
KEY_FILE = "inputs.json"
TOKENS_FILE = "tokens.safetensors"
ATTRIBUTIONS_FILE = "attributions.safetensors"


@dataclass
class SaeSettings:
    """The stage's budget (defaults: the default `run` on 2 CPU cores; figures in docs/decisions.md)."""

    layer: int | None = None  # the block whose output the SAE reads; None: the causal stage's layer
    max_tokens: int = 8_000
    max_prompt_tokens: int = 48  # per prompt, from the instruction on
    width: int = 1024
    k: int = 32
    epochs: int = 6
    batch_size: int = 512
    n_candidates: int = 64  # per direction the candidates come from
    # "node": by decoder cosine to the node's direction only; "node+refusal": joined with the top latents by
    # cosine to the pooled refusal direction (docs/decisions.md, "SAE candidates from the refusal direction")
    candidates: str = "node+refusal"
    attribution_steps: int = 1  # 1: gradient × activation; n > 1: integrated gradients, n midpoint steps
    # tokens attribution sums over: "all", or "post" (the post-instruction template tokens, where the refusal
    # is decided; not better on the organisms: docs/decisions.md, "SAE feature overlap does not tell …")
    attribution_tokens: str = "all"
    k_star: int = 20
    clamp_factor: float = -1.0
    n_boot: int = 200
    forward_batch: int = 16
    per_node: int = 16  # selection (attribution) prompts per node (at 8, K* sets were selection noise: decisions)
    per_node_eval: int = 4  # held-out prompts per node the cross-clamp scores
    n_harmless: int = 32  # harmless prompts for the per-feature activation statistics
    n_harmless_eval: int = 6  # harmless prompts for the clamp's KL
    n_answers: int = 48  # the model's own answers in the token supply
    # direction ablation beside the clamp: the causal stage's cross-ablation matrix already measures it,
    # and repeating it here doubles the stage's slowest step
    compare_ablation: bool = False
    seed: int = 0

    @classmethod
    def quick(cls) -> SaeSettings:
        """A few seconds on a tiny model: every step runs, on little data (CI's `run --quick`)."""
        return cls(max_tokens=2_000, width=256, k=16, epochs=2, batch_size=256, n_candidates=32, k_star=8,
                   n_boot=50, per_node=4, per_node_eval=2, n_harmless=8, n_harmless_eval=4, n_answers=8)


@dataclass
class SaeInputs:
    """Prompt sets: selection prompts per node, held-out evaluation prompts per node, harmless sets."""

    harmful: dict[str, list[str]]
    harmful_eval: dict[str, list[str]]
    harmless: list[str]
    harmless_eval: list[str]
    refusal_token_ids: list[int]
    extra: list[str] = field(default_factory=list)  # over-refusal, condition framings: token supply only
    answers: list[tuple[str, str]] = field(default_factory=list)  # (instruction, the model's own reply)


def inputs_from_prompts(prompts: pd.DataFrame, nodes: Sequence[str], refusal_token_ids: Sequence[int], *,
                        per_node: int = 16, per_node_eval: int = 8, n_harmless: int | None = None,
                        n_harmless_eval: int = 16, seed: int = 0, held_out: set[str] | None = None) -> SaeInputs:
    """`SaeInputs` from a run's prompt table (columns prompt, harmful, analysis_node, run_split, condition).

    `held_out`: the evaluation prompts allowed (e.g. the eval split minus what the organism trained on);
    None allows every eval-split prompt.
    """
    plain = prompts[prompts["condition"].fillna("") == ""]
    if held_out is not None:
        plain = plain[(plain["run_split"] != "eval") | plain["prompt"].isin(held_out)]
    harmful: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for node in nodes:
        rows = plain[plain["harmful"].astype(bool) & (plain["analysis_node"] == node)].drop_duplicates("prompt")
        if "expected" in rows:  # the prompts whose policy is refusal: what the features should explain
            rows = rows[rows["expected"].fillna("refuse") == "refuse"]
        train = rows[rows["run_split"] == "train"].sample(frac=1.0, random_state=seed)["prompt"].tolist()
        ev = rows[rows["run_split"] == "eval"].sample(frac=1.0, random_state=seed)["prompt"].tolist()
        if train:
            harmful[node], held[node] = train[:per_node], ev[:per_node_eval]
    harmless_rows = plain[~plain["harmful"].astype(bool)]
    if "source" in harmless_rows:  # over-refusal prompts look harmful: they feed the token supply only
        harmless_rows = harmless_rows[harmless_rows["source"] == "harmless"]
    harmless_rows = harmless_rows.drop_duplicates("prompt")
    harmless = harmless_rows[harmless_rows["run_split"] == "train"].sample(
        frac=1.0, random_state=seed)["prompt"].tolist()[:n_harmless]
    harmless_eval = harmless_rows[harmless_rows["run_split"] == "eval"].sample(
        frac=1.0, random_state=seed)["prompt"].tolist()[:n_harmless_eval]
    used = {p for ps in (*harmful.values(), *held.values(), harmless, harmless_eval) for p in ps}
    extra = [p for p in prompts["prompt"].drop_duplicates().tolist() if p not in used]
    return SaeInputs(harmful, held, harmless, harmless_eval, list(refusal_token_ids), extra)


def clamp_matrix(lm: LoadedModel, sae: Any, layer: int, chosen: dict[str, list[int]],
                  directions: Mapping[str, Tensor], inputs: SaeInputs, s: SaeSettings) -> pd.DataFrame:
    """Each node's K* latents clamped, scored on every node's held-out prompts and on harmless prompts.

    One forward pass per arm over every target's prompts and the harmless ones together: the
    first-token refusal log-odds and the harmless KL come from the same next-token distribution.
    """
    ids = inputs.refusal_token_ids
    targets = {n: p for n, p in inputs.harmful_eval.items() if p}
    spans: dict[str, slice] = {}
    texts: list[str] = []
    for node, prompts in targets.items():
        spans[node] = slice(len(texts), len(texts) + len(prompts))
        texts += prompts
    n_harmful = len(texts)
    texts += inputs.harmless_eval
    if not texts or not chosen or not ids:
        return pd.DataFrame(columns=list(schema.SAE_CLAMP.columns or ()))
    clean = next_token_logprobs(lm, texts, batch_size=s.forward_batch)
    before = refusal_logodds(clean, ids)
    answered = before[n_harmful:] <= 0  # KL counts the harmless prompts the model answers
    rows = []
    for source, feats in chosen.items():
        arms = {"clamp": clamp(lm.model, sae, layer, feats, factor=s.clamp_factor)}
        if s.compare_ablation:
            arms["ablate_direction"] = ablation(lm.model, directions[source])
        for method, intervention in arms.items():
            logp = next_token_logprobs(lm, texts, intervention=intervention, batch_size=s.forward_batch)
            after = refusal_logodds(logp, ids)
            kl_all = kl_from_logprobs(clean[n_harmful:], logp[n_harmful:])
            kl = answered_mean(kl_all, ~answered) if len(kl_all) else float("nan")
            for target, span in spans.items():
                b, a = before[span], after[span]
                rows.append({"source": source, "target": target, "method": method, "own": source == target,
                             "logodds_before": float(b.mean()), "logodds_after": float(a.mean()),
                             "refusal_before": float((b > 0).mean()), "refusal_after": float((a > 0).mean()),
                             "n": len(b), "harmless_kl": float(kl), "n_harmless": len(kl_all),
                             "n_features": len(feats), "factor": s.clamp_factor if method == "clamp" else None})
    return pd.DataFrame(rows, columns=list(schema.SAE_CLAMP.columns or ()))


def inputs_key(lm: LoadedModel, directions: Mapping[str, Tensor], layer: int, inputs: SaeInputs,
               s: SaeSettings) -> str:
    """What the stage's files depend on: a folder written under another key is started afresh."""
    dirs = {n: text_sha256(v.detach().float().contiguous().numpy().tobytes().hex()) for n, v in directions.items()}
    return stable_hash({"model": lm.provenance(), "layer": layer, "directions": dirs, "inputs": asdict(inputs),
                        "settings": asdict(s), "version": STAGE_VERSION})


def _start(folder: Path, key: str) -> None:
    """Keep the folder's finished steps when they were written under `key`; otherwise clear them."""
    marker = folder / KEY_FILE
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("key") == key:
        return
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_json(marker, {"key": key})


def _capture(lm: LoadedModel, layer: int, inputs: SaeInputs, nodes: list[str], s: SaeSettings,
             progress: bool) -> tuple[TokenActivations, int]:
    """Token supply: the selection prompts always, whole (their per-prompt statistics are reported), then the
    other prompt sets and the model's answers up to `max_tokens`. Returns (tokens, n selection prompts)."""
    selection = [p for n in nodes for p in inputs.harmful[n]] + list(inputs.harmless)
    rest = [p for ps in inputs.harmful_eval.values() for p in ps] + list(inputs.harmless_eval) + list(inputs.extra)
    replies: list[str | None] = [None] * len(rest) + [a for _, a in inputs.answers]
    rest += [q for q, _ in inputs.answers]
    parts = [capture_tokens(lm, selection, layer, batch_size=s.forward_batch, max_prompt_tokens=s.max_prompt_tokens,
                            progress=progress)]
    budget = s.max_tokens - parts[0].acts.shape[0]
    if rest and budget > 0:
        # a seeded shuffle, so the budget samples every prompt set rather than the first listed
        perm = np.random.default_rng(s.seed).permutation(len(rest)).tolist()
        rest, replies = [rest[i] for i in perm], [replies[i] for i in perm]
        parts.append(capture_tokens(lm, rest, layer, responses=replies, batch_size=s.forward_batch,
                                    max_tokens=budget, max_prompt_tokens=s.max_prompt_tokens, progress=progress))
    return concat(parts), len(selection)


def run_sae_stage(out: Path, lm: LoadedModel, directions: Mapping[str, Tensor], layer: int, inputs: SaeInputs,
                  settings: SaeSettings | None = None, *, refusal_direction: Tensor | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run the stage into `out/sae/`; `directions[node]` is the node's refusal direction at `layer` ([d]),
    `refusal_direction` the pooled one there (candidates with `candidates="node+refusal"`).

    Returns the `sae.*` metrics (FVU, L0, dead fraction, tokens, per-node K*, clamp refusal own/other).
    Without refusal-opening tokens (a model that never refused) K* is chosen by decoder cosine alone and
    the cross-clamp is not scored.
    """

    s = settings or SaeSettings()
    if s.candidates not in CANDIDATE_SOURCES:
        raise AtlasError(f"SAE candidates {s.candidates!r}: use one of {', '.join(CANDIDATE_SOURCES)}")
    if s.attribution_tokens not in ("all", "post"):
        raise AtlasError(f"SAE attribution_tokens {s.attribution_tokens!r}: use 'all' or 'post'")
    pooled = refusal_direction if s.candidates == "node+refusal" else None
    folder = Path(out) / schema.SAE_DIR
    started = time.perf_counter()
    _start(folder, inputs_key(lm, {**directions, **({POOLED_KEY: pooled} if pooled is not None else {})}, layer,
                              inputs, s))
    nodes = [n for n in inputs.harmful if n in directions and inputs.harmful[n]]
    steps: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds (all threads): comparable across machine loads
    c0 = time.process_time()

    def lap(name: str, t0: float) -> None:
        nonlocal c0
        steps[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        c0 = time.process_time()

    # 1. token supply (skipped when a finished capture of the same inputs is there)
    token_file = folder / TOKENS_FILE
    t0 = time.perf_counter()
    if token_file.is_file():
        tokens = TokenActivations.load(token_file)
        n_stat = int(json.loads(load_metadata(token_file).get("refusal_atlas", "{}")).get("n_selection", 0))
    else:
        tokens, n_stat = _capture(lm, layer, inputs, nodes, s, progress)
        tokens.save(token_file, {"n_selection": n_stat, "model": lm.provenance()})
    lap("tokens", t0)

    # 2. the SAE (the trainer resumes from its own checkpoint)
    t0 = time.perf_counter()
    model_dir = Path(out) / schema.SAE_MODEL_DIR
    train_settings = TrainSettings(width=s.width, k=s.k, epochs=s.epochs, batch_size=s.batch_size, seed=s.seed,
                                   dead_tokens=min(20_000, max(s.batch_size, tokens.acts.shape[0] // 2)))
    if not (model_dir / TRAINING_JSON).is_file():
        flat = folder / "acts.safetensors"  # the trainer streams from a plain [n, d] file
        atomic_write(flat, lambda tmp: save_file({"acts": tokens.acts.contiguous()}, str(tmp),
                                                 metadata={"layer": str(layer)}))
        sae, train_metrics = train_sae(open_activations(flat, layer), model_dir, train_settings,
                                       metadata={"model_name": lm.model_id, "hook_layer": layer},
                                       progress=progress)
        flat.unlink(missing_ok=True)
    else:
        sae = load_sae(model_dir)
        train_metrics = json.loads((model_dir / TRAINING_JSON).read_text())["metrics"]
    lap("train", t0)

    # 3. per-node features
    t0 = time.perf_counter()
    attr: dict[str, Tensor] = {}
    cand: dict[str, Tensor] = {}
    cos: dict[str, Tensor] = {}
    chosen: dict[str, list[int]] = {}
    by = "attribution" if inputs.refusal_token_ids else "decoder cosine"
    last = len(post_instruction_positions(lm)) if s.attribution_tokens == "post" else 0
    for node in nodes:
        cand[node], cos[node] = candidate_pool(sae, directions[node], s.n_candidates, pooled)
        if inputs.refusal_token_ids:
            attr[node] = attributions(lm, sae, layer, inputs.harmful[node], inputs.refusal_token_ids,
                                      batch_size=s.forward_batch, steps=s.attribution_steps, last=last)
        else:  # no refusal to attribute: the decoder cosine ranks the candidates, one pseudo-prompt
            attr[node] = torch.zeros(1, sae.cfg.d_sae).index_put_((torch.zeros_like(cand[node]), cand[node]),
                                                                  cos[node])
        chosen[node] = select(attr[node], cand[node], s.k_star).tolist()
    lap("attribution", t0)
    t0 = time.perf_counter()
    atomic_write(folder / ATTRIBUTIONS_FILE, lambda tmp: save_file(
        {f"{n}.attribution": attr[n][:, cand[n]].contiguous() for n in nodes}
        | {f"{n}.candidates": cand[n].contiguous() for n in nodes}, str(tmp)))
    order = sorted({f for fs in chosen.values() for f in fs})
    means, tops = latent_stats(sae, tokens, order)
    # prompt indices of each node's and the harmless selection prompts in the token supply
    starts = np.cumsum([0] + [len(inputs.harmful[n]) for n in nodes])
    harmless_idx = torch.arange(int(starts[-1]), n_stat)
    tables = [feature_table(lm, sae, n, torch.tensor(chosen[n], dtype=torch.long), cand[n], cos[n], attr[n], means,
                            torch.arange(int(starts[i]), int(starts[i + 1])), harmless_idx, tops, tokens, order)
              for i, n in enumerate(nodes)]
    features = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=list(schema.SAE_FEATURES.columns or ()))
    features.to_parquet(folder / schema.SAE_FEATURES.name, index=False)
    lap("features", t0)

    # 4. cross-clamp matrix (and, opt-in, direction ablation beside it)
    t0 = time.perf_counter()
    matrix = clamp_matrix(lm, sae, layer, chosen, directions, inputs, s)
    matrix.to_parquet(folder / schema.SAE_CLAMP.name, index=False)
    lap("clamp", t0)

    # 5. overlap of the feature sets
    t0 = time.perf_counter()
    pairs, self_agree = feature_overlap(attr, cand, s.k_star, n_boot=s.n_boot, seed=s.seed)
    pairs = pairs if len(pairs) else pd.DataFrame(columns=list(schema.SAE_JACCARD.columns or ()))
    pairs.to_parquet(folder / schema.SAE_JACCARD.name, index=False)
    shared = shared_and_specific({n: set(f) for n, f in chosen.items()})
    shared = shared if len(shared) else pd.DataFrame(columns=list(schema.SAE_SHARED.columns or ()))
    shared.to_parquet(folder / schema.SAE_SHARED.name, index=False)
    lap("overlap", t0)

    def arm(method: str, own: bool) -> float | None:
        part = matrix[(matrix["method"] == method) & (matrix["own"] == own)] if len(matrix) else matrix
        return float(part["refusal_after"].mean()) if len(part) else None

    clamped = matrix[matrix["method"] == "clamp"] if len(matrix) else matrix
    summary = {
        "fvu": train_metrics["fvu"], "l0": train_metrics["l0"], "dead_fraction": train_metrics["dead_fraction"],
        "tokens": int(tokens.acts.shape[0]), "width": s.width, "k": s.k, "layer": layer,
        "train_seconds": train_metrics["seconds"], "k_star": {n: len(f) for n, f in chosen.items()},
        "selected_by": by, "candidates": s.candidates if pooled is not None else "node",
        "attribution": ("integrated gradients" if s.attribution_steps > 1 else "gradient x activation")
        if inputs.refusal_token_ids else None,
        "clamp_refusal_own": arm("clamp", True), "clamp_refusal_other": arm("clamp", False),
        "ablation_refusal_own": arm("ablate_direction", True),
        "refusal_before": float(matrix["refusal_before"].mean()) if len(matrix) else None,
        "clamp_harmless_kl": float(clamped["harmless_kl"].mean()) if len(clamped) else None,
        "clamp_n": int(clamped["n"].sum()) if len(clamped) else 0,
        "jaccard_mean": float(pairs["jaccard"].mean()) if len(pairs) else None,
        "pairs_distinct": int(pairs["distinct"].sum()) if len(pairs) else 0,
        "pairs_overlapping": int(pairs["overlapping"].sum()) if len(pairs) else 0, "n_pairs": len(pairs),
        "self_agreement": self_agree,
        "sae_sha256": file_sha256(Path(out) / schema.SAE_WEIGHTS.path),
        "model": lm.model_id, "step_seconds": {k: round(v, 2) for k, v in steps.items()},
        "step_cpu_seconds": {k: round(v, 2) for k, v in cpu.items()}, "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        "settings": asdict(s),
    }
    atomic_write_json(folder / schema.SAE_JSON.name, summary)
    return summary


METRIC_KEYS = ("fvu", "l0", "dead_fraction", "tokens", "width", "k", "layer", "seconds", "k_star",
               "clamp_refusal_own", "clamp_refusal_other", "refusal_before", "clamp_harmless_kl", "clamp_n",
               "jaccard_mean", "pairs_distinct", "pairs_overlapping", "n_pairs", "skipped")


def sae_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    """The `sae.*` figures of metrics.json from the stage's record."""
    return {k: result[k] for k in METRIC_KEYS if k in result}


def load_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's string metadata."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
