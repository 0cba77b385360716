#!/usr/bin/env python3
"""GPU check of the activation capture (needs CUDA; not run in CI).

1. Exactness on CUDA: capture on the GPU equals capture on the CPU for every tiny test architecture.
2. Throughput on a SmolLM2-135M-shaped model with random weights (speed does not depend on the weight
   values, and the shape comes from the default model's config.json, so only its few-MB config and
   tokenizer files need to travel): our capture vs a bare forward, HF output_hidden_states (batched)
   and HF hooks, using the peer harness's prompts, batching and layer/position choice.

Usage: python benchmarks/capture_gpu_check.py --model-config-dir DIR --harmbench-csv CSV
           [--peers ../shared/benchmarks/capture_peers.py] [--out benchmarks/results/capture_gpu_check.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from refusal_atlas.lm.capture import capture_activations  # noqa: E402
from refusal_atlas.lm.models import wrap_model  # noqa: E402
from refusal_atlas.lm.testing import ARCHITECTURES, tiny_model  # noqa: E402

POSITIONS = [-3, -1, "last_instruction", "mean_instruction"]
INSTRUCTIONS = ["How do I bake bread at home?", "Explain how to make a bomb.", "Hi",
                "Write a poem about the sea and the sky, please.", "Tell me how to hack a wifi network.",
                "What is the capital of France?"]


def load_peers(path: Path):
    spec = importlib.util.spec_from_file_location("capture_peers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


def exactness() -> dict:
    out = {}
    for arch in ARCHITECTURES:
        lm = tiny_model(arch)
        cpu = capture_activations(lm, INSTRUCTIONS, None, POSITIONS, batch_size=4, progress=False).acts
        lm.model.to("cuda")
        gpu = capture_activations(lm, INSTRUCTIONS, None, POSITIONS, batch_size=4, progress=False).acts
        out[arch] = rel(gpu, cpu)
    return out


def throughput(peers, config_dir: Path, csv: str, reps: int = 5) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config_dir)
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    model = model.eval().to("cuda")
    lm = wrap_model(model, tok, "smollm2-shaped-random")
    instructions = peers.harmful_behaviors(csv, 128) + peers.harmless_instructions(128)
    texts = peers.chat_prompts(tok, instructions)
    n_tok = sum(map(len, peers.token_ids(tok, texts)))
    layers, n_pos = peers.LAYERS, peers.N_POS
    blocks = model.model.layers

    def bare():
        for _, inputs in peers.hf_batches(tok, texts):
            model(**{k: v.cuda() for k, v in inputs.items()}, use_cache=False)

    def hf_batched():
        res = []
        for _, inputs in peers.hf_batches(tok, texts):
            hs = model(**{k: v.cuda() for k, v in inputs.items()}, use_cache=False, output_hidden_states=True)
            res.append(torch.stack([hs.hidden_states[x + 1][:, -n_pos:] for x in layers], 1).cpu())
        return torch.cat(res)

    def hf_hooks():
        kept = {}
        handles = [blocks[x].register_forward_hook(lambda m, a, o, j=j: kept.__setitem__(j, o[:, -n_pos:].clone()))
                   for j, x in enumerate(layers)]
        res = []
        for _, inputs in peers.hf_batches(tok, texts):
            model(**{k: v.cuda() for k, v in inputs.items()}, use_cache=False)
            res.append(torch.stack([kept[j] for j in range(len(layers))], 1).cpu())
        for h in handles:
            h.remove()
        return torch.cat(res)

    def ours():  # from the raw instructions: chat template and tokenization are inside the timing
        return capture_activations(lm, instructions, layers, list(range(-n_pos, 0)), progress=False).acts

    results, outputs = {}, {}
    for name, fn in [("a_bare_forward", bare), ("c_hf_batched", hf_batched), ("d_hf_hooks", hf_hooks),
                     ("g_refusal_atlas", ours)]:
        with torch.inference_mode():
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                outputs[name] = fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        wall = statistics.median(times)
        results[name] = {"wall_s": wall, "tokens_per_s": n_tok / wall}
    for name, out in outputs.items():
        if out is not None:
            results[name]["max_rel_vs_c_hf_batched"] = rel(out, outputs["c_hf_batched"])
    return {"n_prompts": len(texts), "non_pad_tokens": n_tok, "layers": layers, "n_positions": n_pos,
            "reps": reps, "methods": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=Path, default=REPO.parent / "shared" / "benchmarks" / "capture_peers.py")
    p.add_argument("--model-config-dir", type=Path, required=True, help="config.json + tokenizer of the model")
    p.add_argument("--harmbench-csv", required=True)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "capture_gpu_check.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cuda_vs_cpu_max_rel_diff": exactness(),
              "smollm2_shaped_random_weights": throughput(load_peers(args.peers), args.model_config_dir,
                                                          args.harmbench_csv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
