#!/usr/bin/env python3
"""Our TopK SAE trainer vs SAELens's `SAETrainer` on the same activations (one run each), plus encode speed.

Activations: the default chat model's block output at `--layer` for every token from the instruction
on, over the default prompt set (harmful + harmless + over-refusal), chat-formatted, capped at
`--tokens` (cached in the results folder). Both trainers see the same rows in the same shuffled
order, the same width, k, batch size, learning rate and number of samples; SAELens normalises by its
`expected_average_only_in` scale (as ours does) and keeps its own AuxK defaults. Both SAEs are then
scored by the same code (`train.evaluate`: FVU, L0, dead fraction over every row).

Usage: nice python benchmarks/sae_bench.py [--tokens 40000] [--layer 15] [--width 2048] [--k 32]
       [--epochs 5] [--out benchmarks/results/sae_bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"


def activations(path: Path, layer: int, n_tokens: int) -> Path:
    from safetensors.torch import save_file

    from refusal_atlas.curation.prompts import build_prompt_set
    from refusal_atlas.lm.models import load_model
    from refusal_atlas.mechinterp.sae.tokens import capture_tokens

    if path.is_file():
        return path
    prompts = build_prompt_set(seed=0)["prompt"].drop_duplicates().sample(frac=1.0, random_state=0).tolist()
    lm = load_model("default")
    t0 = time.perf_counter()
    toks = capture_tokens(lm, prompts, layer, max_tokens=n_tokens, max_prompt_tokens=128, batch_size=16)
    seconds = time.perf_counter() - t0
    save_file({"acts": toks.acts.contiguous()}, str(path),
              metadata={"layer": str(layer), "capture_seconds": f"{seconds:.1f}", "n_prompts": str(len(prompts))})
    return path


def ours(source, out: Path, args: argparse.Namespace) -> dict:
    from refusal_atlas.mechinterp.sae.train import TrainSettings, train_sae

    settings = TrainSettings(width=args.width, k=args.k, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                             seed=0)
    t0 = time.perf_counter()
    _, metrics = train_sae(source, out, settings, progress=False)
    return {**metrics, "wall_seconds": time.perf_counter() - t0}


def sae_lens_run(source, out: Path, args: argparse.Namespace) -> dict:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from refusal_atlas.mechinterp.sae import load_sae
    from refusal_atlas.mechinterp.sae.train import evaluate

    steps = source.n_rows // args.batch * args.epochs

    def provider() -> Iterator[torch.Tensor]:
        epoch = 0
        while True:  # the same seeded epoch orders as our trainer
            yield from source.batches(args.batch, seed=epoch)
            epoch += 1

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=source.d_in, d_sae=args.width, k=args.k,
                                                normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                           lr=args.lr, lr_end=args.lr, n_batches_for_norm_estimate=40)
    t0 = time.perf_counter()
    trained = SAETrainer(cfg, sae, provider()).fit()
    seconds = time.perf_counter() - t0
    trained.save_inference_model(out)
    return {**evaluate(load_sae(out), source), "steps": steps, "seconds": seconds, "wall_seconds": seconds}


def encode_speed(sae_dir: Path, source) -> dict:
    from sae_lens import SAE

    from refusal_atlas.mechinterp.sae import load_sae

    x = source.sample(min(source.n_rows, 8192))
    mine, theirs = load_sae(sae_dir), SAE.load_from_disk(sae_dir)
    out = {}
    for name, model in (("ours", mine), ("sae_lens", theirs)):
        with torch.no_grad():
            model.encode(x[:512])
            t0 = time.perf_counter()
            for chunk in x.split(1024):
                model.encode(chunk)
            out[f"{name}_tokens_per_s"] = x.shape[0] / (time.perf_counter() - t0)
    with torch.no_grad():
        out["max_abs_diff"] = float((mine.encode(x[:1024]) - theirs.encode(x[:1024])).abs().max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=40_000)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=RESULTS / "sae_bench.json")
    args = ap.parse_args()
    from refusal_atlas.mechinterp.sae.data import open_activations
    from refusal_atlas.paths import cache_dir

    work = cache_dir() / "sae_bench"  # activations and the two SAEs: large, kept out of the repository
    work.mkdir(parents=True, exist_ok=True)
    acts = activations(work / f"acts_l{args.layer}_{args.tokens}.safetensors", args.layer, args.tokens)
    source = open_activations(acts)
    result = {"tokens": source.n_rows, "d_in": source.d_in, "layer": args.layer, "width": args.width, "k": args.k,
              "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine()}
    from safetensors import safe_open

    with safe_open(str(acts), framework="pt") as f:
        result["capture_seconds"] = float((f.metadata() or {}).get("capture_seconds", "nan"))
    result["ours"] = ours(source, work / "ours", args)
    result["sae_lens"] = sae_lens_run(source, work / "sae_lens", args)
    result["encode"] = encode_speed(work / "ours", source)
    result["train_speed_ratio_sae_lens_over_ours"] = result["sae_lens"]["seconds"] / result["ours"]["seconds"]
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
