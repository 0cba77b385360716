"""The `sae` stage of `run`: train an SAE on the run's chat activations, then per-node features.

Steps (each writes into `<out>/sae/` and is skipped on a rerun when its file is already there):
1. tokens: every prompt set of the run (harmful, harmless, over-refusal, condition framings, plus
   any model answers given), chat-formatted, block `layer`'s output at every token from the
   instruction on, capped at `max_tokens` → `tokens.safetensors`;
2. train a TopK SAE (`width`, `k`) → `model/` (SAELens format) + `model/training.json`;
3. per node: candidates by decoder cosine to the node's refusal direction, K* by attribution
   over the node's selection prompts → `features.parquet`, `attributions.safetensors`;
4. clamp each node's K* latents (× `clamp_factor`, error term kept) and, for comparison, ablate the
   node's direction at every layer; first-token refusal on every node's held-out prompts and
   harmless KL → `clamp.parquet` (the cross-clamp matrix);
5. Jaccard of the K* sets with a bootstrap floor → `jaccard.parquet`, `shared.parquet`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from torch import Tensor

from refusal_atlas.hashing import file_sha256
from refusal_atlas.io import atomic_write, atomic_write_json
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.mechinterp.interventions import ablation
from refusal_atlas.mechinterp.sae import load_sae
from refusal_atlas.mechinterp.sae.clamp import clamp
from refusal_atlas.mechinterp.sae.data import open_activations
from refusal_atlas.mechinterp.sae.features import (
    attributions,
    candidates,
    feature_table,
    latent_stats,
    select,
)
from refusal_atlas.mechinterp.sae.overlap import feature_overlap, shared_and_specific
from refusal_atlas.mechinterp.sae.tokens import TokenActivations, capture_tokens, concat
from refusal_atlas.mechinterp.sae.train import TRAINING_JSON, TrainSettings, train_sae
from refusal_atlas.mechinterp.scoring import clean_logprobs, kl_divergence, logit_refusal_score

SUBDIR = "sae"


@dataclass
class SaeSettings:
    max_tokens: int = 40_000
    max_prompt_tokens: int = 128  # per prompt, from the instruction on
    width: int = 2048
    k: int = 32
    epochs: int = 5
    batch_size: int = 512
    n_candidates: int = 100
    k_star: int = 20
    clamp_factor: float = -1.0
    n_boot: int = 200
    forward_batch: int = 16
    # direction ablation beside the clamp: the causal stage's cross-ablation matrix already measures it,
    # and repeating it here doubles the stage's slowest step
    compare_ablation: bool = False
    seed: int = 0


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
                        per_node: int = 16, per_node_eval: int = 8, n_harmless_eval: int = 16,
                        seed: int = 0) -> SaeInputs:
    """`SaeInputs` from a run's prompt table (columns prompt, harmful, analysis_node, run_split, condition)."""
    plain = prompts[prompts["condition"].fillna("") == ""]
    harmful: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for node in nodes:
        rows = plain[plain["harmful"].astype(bool) & (plain["analysis_node"] == node)].drop_duplicates("prompt")
        train = rows[rows["run_split"] == "train"].sample(frac=1.0, random_state=seed)["prompt"].tolist()
        ev = rows[rows["run_split"] == "eval"].sample(frac=1.0, random_state=seed)["prompt"].tolist()
        if train:
            harmful[node], held[node] = train[:per_node], ev[:per_node_eval]
    harmless_rows = plain[~plain["harmful"].astype(bool)]
    if "source" in harmless_rows:  # over-refusal prompts look harmful: they feed the token supply only
        harmless_rows = harmless_rows[harmless_rows["source"] == "harmless"]
    harmless_rows = harmless_rows.drop_duplicates("prompt")
    harmless = harmless_rows[harmless_rows["run_split"] == "train"]["prompt"].tolist()
    harmless_eval = harmless_rows[harmless_rows["run_split"] == "eval"].sample(
        frac=1.0, random_state=seed)["prompt"].tolist()[:n_harmless_eval]
    used = {p for ps in (*harmful.values(), *held.values(), harmless, harmless_eval) for p in ps}
    extra = [p for p in prompts["prompt"].drop_duplicates().tolist() if p not in used]
    return SaeInputs(harmful, held, harmless, harmless_eval, list(refusal_token_ids), extra)


def _first_token_refusal(lm: LoadedModel, prompts: list[str], ids: list[int], intervention: Any,
                         batch: int) -> np.ndarray:

    if not prompts:
        return np.zeros(0)
    return logit_refusal_score(lm, prompts, ids, intervention=intervention, batch_size=batch)


def _clamp_matrix(lm: LoadedModel, sae: Any, layer: int, chosen: dict[str, list[int]],
                  directions: Mapping[str, Tensor], inputs: SaeInputs, s: SaeSettings) -> pd.DataFrame:

    ids = inputs.refusal_token_ids
    targets = {n: p for n, p in inputs.harmful_eval.items() if p}
    clean = {n: _first_token_refusal(lm, p, ids, None, s.forward_batch) for n, p in targets.items()}
    ref = clean_logprobs(lm, inputs.harmless_eval, batch_size=s.forward_batch) if inputs.harmless_eval else None
    rows = []
    for source, feats in chosen.items():
        arms = {"clamp": clamp(lm.model, sae, layer, feats, factor=s.clamp_factor)}
        if s.compare_ablation:
            arms["ablate_direction"] = ablation(lm.model, directions[source])
        for method, intervention in arms.items():
            kl = (float(np.mean(kl_divergence(lm, inputs.harmless_eval, intervention, clean=ref,
                                              batch_size=s.forward_batch))) if ref is not None else float("nan"))
            for target, prompts in targets.items():
                after = _first_token_refusal(lm, prompts, ids, intervention, s.forward_batch)
                rows.append({"source": source, "target": target, "method": method, "own": source == target,
                             "logodds_before": float(clean[target].mean()), "logodds_after": float(after.mean()),
                             "refusal_before": float((clean[target] > 0).mean()),
                             "refusal_after": float((after > 0).mean()), "n": len(prompts), "harmless_kl": kl,
                             "n_features": len(feats), "factor": s.clamp_factor if method == "clamp" else None})
    return pd.DataFrame(rows)


def run_sae_stage(out: Path, lm: LoadedModel, directions: Mapping[str, Tensor], layer: int, inputs: SaeInputs,
                  settings: SaeSettings | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run the stage into `out/sae/`; `directions[node]` is the node's refusal direction at `layer` ([d]).

    Returns the `sae.*` metrics (FVU, L0, dead fraction, tokens, per-node K*, clamp refusal own/other).
    """

    s = settings or SaeSettings()
    folder = Path(out) / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    nodes = [n for n in inputs.harmful if n in directions and inputs.harmful[n]]

    # 1. token supply: the selection prompts always, whole (their per-prompt statistics are reported),
    # then the other prompt sets and answers up to `max_tokens`
    selection = [p for n in nodes for p in inputs.harmful[n]] + list(inputs.harmless)
    n_stat = len(selection)
    rest = [p for ps in inputs.harmful_eval.values() for p in ps] + list(inputs.harmless_eval) + list(inputs.extra)
    replies: list[str | None] = [None] * len(rest) + [a for _, a in inputs.answers]
    rest += [q for q, _ in inputs.answers]
    token_file = folder / "tokens.safetensors"
    t0 = time.perf_counter()
    if token_file.is_file():
        tokens = TokenActivations.load(token_file)
    else:
        parts = [capture_tokens(lm, selection, layer, batch_size=s.forward_batch,
                                max_prompt_tokens=s.max_prompt_tokens, progress=progress)]
        budget = s.max_tokens - parts[0].acts.shape[0]
        if rest and budget > 0:
            # a seeded shuffle, so the budget samples every prompt set rather than the first listed
            perm = np.random.default_rng(s.seed).permutation(len(rest)).tolist()
            rest, replies = [rest[i] for i in perm], [replies[i] for i in perm]
            parts.append(capture_tokens(lm, rest, layer, responses=replies, batch_size=s.forward_batch,
                                        max_tokens=budget, max_prompt_tokens=s.max_prompt_tokens,
                                        progress=progress))
        tokens = concat(parts)
        tokens.save(token_file, {"n_prompts": n_stat + len(rest), "model": lm.provenance()})
    capture_s = time.perf_counter() - t0

    # 2. the SAE
    model_dir = folder / "model"
    train_settings = TrainSettings(width=s.width, k=s.k, epochs=s.epochs, batch_size=s.batch_size, seed=s.seed,
                                   dead_tokens=min(20_000, max(s.batch_size, tokens.acts.shape[0] // 2)))
    flat = folder / "acts.safetensors"  # the trainer streams from a plain [n, d] file
    if not (model_dir / TRAINING_JSON).is_file():
        atomic_write(flat, lambda tmp: save_file({"acts": tokens.acts.contiguous()}, str(tmp),
                                                 metadata={"layer": str(layer)}))
        sae, train_metrics = train_sae(open_activations(flat, layer), model_dir, train_settings,
                                       metadata={"model_name": lm.model_id, "hook_layer": layer},
                                       progress=progress)
        flat.unlink(missing_ok=True)
    else:

        sae = load_sae(model_dir)
        train_metrics = json.loads((model_dir / TRAINING_JSON).read_text())["metrics"]

    # 3. per-node features
    attr: dict[str, Tensor] = {}
    cand: dict[str, Tensor] = {}
    cos: dict[str, Tensor] = {}
    chosen: dict[str, list[int]] = {}
    for node in nodes:
        cand[node], cos[node] = candidates(sae, directions[node], s.n_candidates)
        attr[node] = attributions(lm, sae, layer, inputs.harmful[node], inputs.refusal_token_ids,
                                  batch_size=max(1, s.forward_batch // 2))
        chosen[node] = select(attr[node], cand[node], s.k_star).tolist()
    atomic_write(folder / "attributions.safetensors", lambda tmp: save_file(
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
    features = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    features.to_parquet(folder / "features.parquet", index=False)

    # 4. cross-clamp matrix (and direction ablation beside it)
    matrix = _clamp_matrix(lm, sae, layer, chosen, directions, inputs, s)
    matrix.to_parquet(folder / "clamp.parquet", index=False)

    # 5. overlap of the feature sets
    pairs, self_agree = feature_overlap(attr, cand, s.k_star, n_boot=s.n_boot, seed=s.seed)
    pairs.to_parquet(folder / "jaccard.parquet", index=False)
    shared_and_specific({n: set(f) for n, f in chosen.items()}).to_parquet(folder / "shared.parquet", index=False)

    def arm(method: str, own: bool) -> float | None:
        part = matrix[(matrix["method"] == method) & (matrix["own"] == own)] if len(matrix) else matrix
        return float(part["refusal_after"].mean()) if len(part) else None

    metrics = {
        "fvu": train_metrics["fvu"], "l0": train_metrics["l0"], "dead_fraction": train_metrics["dead_fraction"],
        "tokens": int(tokens.acts.shape[0]), "width": s.width, "k": s.k, "layer": layer,
        "capture_seconds": capture_s, "train_seconds": train_metrics["seconds"],
        "k_star": {n: len(f) for n, f in chosen.items()},
        "clamp_refusal_own": arm("clamp", True), "clamp_refusal_other": arm("clamp", False),
        "ablation_refusal_own": arm("ablate_direction", True),
        "refusal_before": float(matrix["refusal_before"].mean()) if len(matrix) else None,
        "clamp_harmless_kl": float(matrix[matrix["method"] == "clamp"]["harmless_kl"].mean()) if len(matrix) else None,
        "jaccard_mean": float(pairs["jaccard"].mean()) if len(pairs) else None,
        "self_agreement": self_agree,
        "sae_sha256": file_sha256(model_dir / "sae_weights.safetensors"),
        "seconds": time.perf_counter() - started,
        "settings": asdict(s),
    }
    atomic_write_json(folder / "metrics.json", metrics)
    return metrics
