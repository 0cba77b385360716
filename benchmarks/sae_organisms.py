#!/usr/bin/env python3
"""The SAE stage on a `validate` atlas (shared or separable organism), plus the candidate/attribution variants.

Runs only the `sae` stage in a copy of an atlas folder that `refusal-atlas validate` wrote, configured as
`validate` configures that atlas (its sizes, its stages, the lean causal parameter for the separable one), so
every earlier stage is reused from the folder. With `--variants`, the same SAE and prompts are then used to
compare how K* is chosen: attribution summed over every token or over the post-instruction tokens only
("gxa_post"); gradient × activation measured from the harmless prompts' mean latent values instead of
zero ("gxa_h"), and, with `--attr-reference MODEL`, from the latents the model it was fine-tuned from has
on the same tokens ("gxa_ref", "gxa_post_ref": what the fine-tune moved); candidates by decoder cosine to the
node's direction ("node"), to the pooled refusal direction ("refusal", Yeo et al.), to both ("node+refusal") or
every latent ("all"), each ranked by every attribution variant; for each, the Jaccard of every node pair with
its bootstrap interval, self-agreement and chance bound (`mechinterp.sae.overlap.feature_overlap`, the
stage's own code).

Usage (never on the validate folder itself: the stage rewrites `sae/`):
  cp -r /tmp/val/atlas-shared /tmp/h16/shared
  nice python benchmarks/sae_organisms.py /tmp/h16/shared --model default --organism --lean --variants
  nice python benchmarks/sae_organisms.py /tmp/h16/separable --model /tmp/val/organisms/separable/model --lean \
      --reference default --attr-reference default --sae layer=17 --variants --ig-steps 0
  nice python benchmarks/sae_organisms.py /tmp/h16/run --model default --organism --run --variants  # a run's copy
Pass `--lean` / `--reference` exactly as the `validate` that wrote the folder set them (its LEAN and REFERENCE);
the script stops before running anything when a stage other than `sae` would be recomputed.
Results of the session-10 measurement: benchmarks/results/sae_organisms_{shared,separable}.json; sessions 11 and
12: sae_organisms_s11_*.json, sae_organisms_s12_*.json (docs/decisions.md says what each is).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def _variants(cfg: Any, ctx: Any, ig_steps: int, n_boot: int, reference: str | None) -> dict[str, Any]:
    from refusal_atlas.atlas import schema
    from refusal_atlas.atlas.pipeline import load_analysed_model
    from refusal_atlas.atlas.pipeline_causal import REFUSAL_POSITION, _reference_states
    from refusal_atlas.atlas.pipeline_sae import _layer, sae_settings
    from refusal_atlas.atlas.runconfig import evaluation_rows, model_prompts
    from refusal_atlas.atlas.sae_stage import inputs_from_prompts
    from refusal_atlas.lm.positions import post_instruction_positions
    from refusal_atlas.mechinterp.causal.protocol import load_tokens
    from refusal_atlas.mechinterp.directions import POOLED, DirectionSet
    from refusal_atlas.mechinterp.sae import load_sae
    from refusal_atlas.mechinterp.sae.features import attributions, candidates
    from refusal_atlas.mechinterp.sae.overlap import feature_overlap
    from refusal_atlas.mechinterp.sae.tokens import TokenActivations

    lm = load_analysed_model(cfg, ctx)
    s = sae_settings(cfg)
    ds = DirectionSet.load(ctx.out / schema.DIRECTIONS_DIR)
    nodes = [n for n in ds.nodes if n != POOLED]
    layer = _layer(ctx, ds, lm.n_layers, s.layer)
    dirs = {n: ds.get(n, layer, REFUSAL_POSITION) for n in nodes}
    pooled = ds.get(POOLED, layer, REFUSAL_POSITION)
    found = load_tokens(ctx.out / schema.CAUSAL_DIR, lm.revision)
    assert found is not None, "the causal stage found no refusal tokens"
    prompts = model_prompts(ctx.out, cfg)
    inputs = inputs_from_prompts(prompts, nodes, found.ids, per_node=s.per_node, per_node_eval=s.per_node_eval,
                                 n_harmless=s.n_harmless, n_harmless_eval=s.n_harmless_eval, seed=cfg.seed,
                                 held_out=set(evaluation_rows(prompts, ctx.out)["prompt"]))
    nodes = [n for n in nodes if inputs.harmful.get(n)]
    sae = load_sae(ctx.out / schema.SAE_MODEL_DIR)
    unit = {n: v / v.norm() for n, v in {**dirs, POOLED: pooled}.items()}
    record: dict[str, Any] = {"layer": layer, "nodes": nodes,
                              "cosine_to_pooled": {n: float(unit[n] @ unit[POOLED]) for n in nodes}}
    post = len(post_instruction_positions(lm))
    # the harmless selection prompts' mean latent values: the baseline of the "_h" variants
    tokens = TokenActivations.load(ctx.out / schema.SAE_DIR / "tokens.safetensors")
    n_harmful = sum(len(inputs.harmful[n]) for n in nodes)
    rows = tokens.prompt_index >= n_harmful
    rows &= tokens.prompt_index < n_harmful + len(inputs.harmless)
    with torch.no_grad():
        harmless_mean = sae.encode(tokens.acts[rows]).mean(0)
    ref = _reference_states(reference, lm) if reference else None
    methods = (("gxa", 1, 0, None, None), ("gxa_post", 1, post, None, None), ("gxa_h", 1, 0, harmless_mean, None),
               *((("gxa_ref", 1, 0, None, ref), ("gxa_post_ref", 1, post, None, ref)) if ref else ()),
               *(((f"ig{ig_steps}", ig_steps, 0, None, None),) if ig_steps > 1 else ()))
    attr: dict[str, dict[str, torch.Tensor]] = {m[0]: {} for m in methods}
    seconds: dict[str, float] = {}
    for name, steps, last, base, states in methods:
        t0 = time.process_time()
        for n in nodes:
            attr[name][n] = attributions(lm, sae, layer, inputs.harmful[n], found.ids, batch_size=s.forward_batch,
                                         steps=steps, last=last, baseline=base, reference_states=states)
        seconds[name] = round(time.process_time() - t0, 1)
    record["attribution_cpu_seconds"] = seconds
    n_c, d_sae = s.n_candidates, sae.cfg.d_sae
    node_c = {n: candidates(sae, dirs[n], n_c)[0] for n in nodes}
    ref_c = candidates(sae, pooled, n_c)[0]

    def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen = set(a.tolist())
        return torch.cat([a, torch.as_tensor([i for i in b.tolist() if i not in seen], dtype=torch.long)])

    pools = {"node": node_c, "refusal": {n: ref_c for n in nodes},
             "node+refusal": {n: union(node_c[n], ref_c) for n in nodes},
             "all": {n: torch.arange(d_sae) for n in nodes}}
    table = []
    for method, a in attr.items():
        # where each node's attribution mass sits: its top-K* latents over the whole dictionary
        for pool_name, cand in pools.items():
            pairs, self_agree = feature_overlap(a, cand, s.k_star, n_boot=n_boot, seed=s.seed)
            for r in pairs.to_dict("records"):
                table.append({"attribution": method, "candidates": pool_name, **{k: r[k] for k in (
                    "node_a", "node_b", "jaccard", "ci_low", "ci_high", "self_a_low", "self_b_low", "chance_95",
                    "distinct", "overlapping")}, "self_a": self_agree[r["node_a"]],
                    "self_b": self_agree[r["node_b"]], "pool_a": len(cand[r["node_a"]]),
                    "pool_b": len(cand[r["node_b"]])})
        top_all = {n: set(torch.topk(a[n].mean(0), s.k_star).indices.tolist()) for n in nodes}
        record[f"{method}_top_in_node_pool"] = {n: len(top_all[n] & set(node_c[n].tolist())) for n in nodes}
        record[f"{method}_top_in_refusal_pool"] = {n: len(top_all[n] & set(ref_c.tolist())) for n in nodes}
    record["pairs"] = table
    return record


def _check_cached(pipe: Any, rerun: tuple[str, ...]) -> None:
    """Stop before running anything when a stage other than those in `rerun` would be recomputed."""
    from refusal_atlas.atlas.stages import StageRecord

    for stage in pipe.stages:
        if not stage.enabled or stage.name in rerun:
            continue
        path = pipe.out / ".stages" / f"{stage.name}.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        key = pipe._key(stage)
        if saved.get("key") != key:
            raise SystemExit(f"stage {stage.name} would be recomputed (key {key} vs {saved.get('key')}): "
                             "the configuration differs from validate's")
        pipe.records[stage.name] = StageRecord(stage.name, key, saved["seconds"], saved["result"], True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas", type=Path, help="a COPY of a validate atlas folder")
    ap.add_argument("--model", required=True)
    ap.add_argument("--organism", action="store_true", help="the shared organism (built by the run itself)")
    ap.add_argument("--lean", action="store_true", help="causal stage as validate runs it on the separable atlas")
    ap.add_argument("--reference", default=None, help="RunConfig.reference, where validate sets one (newer code)")
    ap.add_argument("--sae", action="append", default=[], help="SaeSettings override KEY=VALUE (JSON value)")
    ap.add_argument("--run", action="store_true",
                    help="ATLAS is a copy of a default `refusal-atlas run` folder (its sizes, stages), not validate's")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--ig-steps", type=int, default=10, help="integrated-gradients steps (below 2: not run)")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--attr-reference", default=None,
                    help="the model the analysed one was fine-tuned from: adds attribution from its latents")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="JSON record (default ATLAS/sae_organisms.json)")
    args = ap.parse_args()

    from rich.console import Console

    from refusal_atlas.atlas.pipeline import RunConfig, build_pipeline
    from refusal_atlas.cli.validate import SIZES, VERDICT_STAGES

    torch.set_num_threads(args.threads)
    more = {"reference": args.reference} if args.reference is not None else {}
    cfg = RunConfig(model=args.model, organism=args.organism, out=args.atlas, seed=0, threads=args.threads,
                    progress=False, **more)
    if not args.run:
        cfg.extra["sizes"] = dict(SIZES["full"])
    pipe = build_pipeline(cfg, Console(stderr=True))
    # the overrides reach the sae stage through cfg only: every stage's key holds the old `extra` dict,
    # so the cached stages stay cached (the sae stage's own folder key holds its settings)
    cfg.extra = {**cfg.extra, "sae": {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.sae)}}
    record: dict[str, Any] = {}
    for stage in pipe.stages:
        stage.enabled = stage.enabled and (args.run or stage.name in (*VERDICT_STAGES, "sae"))
        if stage.name == "causal" and args.lean:
            stage.params = {**stage.params, "verdict_evidence_only": True}
        if stage.name == "sae":
            run_stage = stage.fn

            def fn(ctx: Any, run_stage: Any = run_stage) -> dict[str, Any]:
                result = run_stage(ctx)
                record["stage"] = result
                if args.variants:
                    record["variants"] = _variants(cfg, ctx, args.ig_steps, args.n_boot, args.attr_reference)
                return result

            stage.fn = fn
    # a run's folder: the stages after `sae` (verdicts, atlas: seconds) are redone with it
    rerun = ("sae", "verdicts", "atlas") if args.run else ("sae",)
    _check_cached(pipe, rerun)
    (args.atlas / ".stages" / "sae.json").unlink(missing_ok=True)  # always rerun the stage itself
    records = pipe.run()
    assert "sae" in (redone := [n for n, r in records.items() if not r.cached]) and set(redone) <= set(rerun)
    out = args.out or args.atlas / "sae_organisms.json"
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
