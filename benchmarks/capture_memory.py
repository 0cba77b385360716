#!/usr/bin/env python3
"""Peak-memory scaling of `capture_activations`: `python benchmarks/capture_memory.py N [SHARD_DIR]`.

One warmed-up process per N: the peers' harness prompts (150 HarmBench + 128 harmless), cycled to N;
prints how much the process's peak RSS grows over the capture call and the size of the returned tensor.
Results: `benchmarks/results/capture_memory_scaling.md`.
"""

from __future__ import annotations

import gc
import resource
import sys

import torch
from capture_bench import DEFAULT_PEERS, default_paths, load_peers

from refusal_atlas.lm.capture import capture_activations
from refusal_atlas.lm.models import load_model

LAYERS = [5, 10, 15, 20, 25]
POSITIONS = list(range(-5, 0))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    n = int(sys.argv[1])
    out_dir = sys.argv[2] if len(sys.argv) > 2 else None
    torch.set_num_threads(2)
    peers = load_peers(DEFAULT_PEERS)
    _, csv = default_paths()
    instructions = peers.harmful_behaviors(csv, 150) + peers.harmless_instructions(128)
    instructions = (instructions * (n // len(instructions) + 1))[:n]
    lm = load_model("default")
    capture_activations(lm, instructions[:8], layers=LAYERS, positions=POSITIONS, progress=False)  # warm-up
    gc.collect()
    before = peak_mib()
    acts = capture_activations(lm, instructions, layers=LAYERS, positions=POSITIONS, progress=False, out_dir=out_dir)
    print(f"{n} prompts: peak RSS +{peak_mib() - before:.1f} MiB, output {acts.acts.numel() * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
