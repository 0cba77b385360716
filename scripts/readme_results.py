"""Regenerate the README's "Results (the default run)" block from an atlas folder's own files.

    .venv/bin/python scripts/readme_results.py atlas-out > /tmp/results.md   # or --write README.md

Every figure in the block comes from metrics.json, manifest.json, findings.json and harm/cells.csv of
the named run; nothing is typed by hand. `--write` replaces the text between the README's
`<!-- results:begin -->` and `<!-- results:end -->` markers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(atlas: Path, machine: str, state: str) -> str:
    metrics = json.loads((atlas / "metrics.json").read_text())
    manifest = json.loads((atlas / "manifest.json").read_text())
    stages = manifest.get("stages", {})
    cached = any(rec.get("cached") for rec in stages.values())
    times = ", ".join(f"{name} {rec['seconds']:.0f} s" + (" (cached)" if rec.get("cached") else "")
                      for name, rec in stages.items())
    lines = [f"Run: `{manifest.get('command', 'refusal-atlas run')}` with seed {manifest['seeds']['global']} on "
             f"{machine}, {state}; {'this invocation' if cached else 'total'} {manifest['total_seconds']:.0f} s "
             f"(stage seconds when run: {times}).", ""]
    lines += ["| figure (`metrics.json` key) | value |", "|---|---|"]
    org, ab, st = metrics.get("organism", {}), metrics.get("ablation", {}), metrics.get("steering", {})
    clusters, sae = metrics.get("clusters", {}), metrics.get("sae") or {}
    wording = clusters.get("wording") or {}
    said, adherence = wording.get("said") or {}, wording.get("adherence") or {}
    tree_branch = (clusters.get("tree_vs_taxonomy") or {}).get("branch") or {}
    taught = clusters.get("wording_taught") or {}
    taught_adh = taught.get("adherence") or {}
    rows = [
        ("organism.heldout_refusal_rate", org.get("heldout_refusal_rate")),
        ("organism.harmless_refusal_rate", org.get("harmless_refusal_rate")),
        ("organism.permitted_compliance_rate", org.get("permitted_compliance_rate")),
        ("organism.restricted_refusal_rate", org.get("restricted_refusal_rate")),
        ("detector.f1", metrics.get("detector", {}).get("f1")),
        ("clusters.seed_ari / node_ari / n_clusters",
         f"{_fmt(metrics['clusters'].get('seed_ari'))} / {_fmt(metrics['clusters'].get('node_ari'))} / "
         f"{_fmt(metrics['clusters'].get('n_clusters'))}"),
        ("clusters.wording_ari (exact-text ceiling, n)",
         f"{_fmt(clusters.get('wording_ari'))} ({_fmt(wording.get('exact_text_ari'))}, n = {_fmt(wording.get('n'))})"),
        ("clusters.wording.said: ARI vs the planted wording each reply says (groups, n)",
         f"{_fmt(said.get('ari'))} ({_fmt(said.get('groups'))}, n = {_fmt(said.get('n'))})"),
        ("clusters.wording.adherence: reply says its taught wording / any planted wording (n)",
         f"{_fmt(adherence.get('rate'))} / {_fmt(adherence.get('said_a_planted_wording'))} "
         f"(n = {_fmt(adherence.get('n'))})"),
        ("clusters.wording_taught: on the taught requests, ARI vs the taught groups (groups, n) / adherence",
         f"{_fmt(taught.get('ari'))} ({_fmt(taught.get('groups'))}, n = {_fmt(taught.get('n'))}) / "
         f"{_fmt(taught_adh.get('rate'))}"),
        ("clusters.tree_vs_taxonomy.branch ARI (level's clusters, n)",
         f"{_fmt(tree_branch.get('ari'))} ({_fmt(tree_branch.get('n_clusters'))}, n = {_fmt(tree_branch.get('n'))})"),
        ("directions.median_noise_floor", metrics.get("directions", {}).get("median_noise_floor")),
        ("directions.nodes (causally tested)", ", ".join(metrics.get("directions", {}).get("nodes") or [])),
        ("directions.nodes_with_directions", metrics.get("directions", {}).get("nodes_with_directions")),
        ("ablation: layer / ablated from / tier", f"{ab.get('layer')} / {ab.get('ablate_from')} / {ab.get('tier')}"),
        (f"ablation.refusal_before → refusal_after (n = {ab.get('n_harmful')})",
         f"{_fmt(ab.get('refusal_before'))} → {_fmt(ab.get('refusal_after'))}"),
        ("ablation.harmless_kl", ab.get("harmless_kl")),
        (f"steering.induced_refusal_rate (n = {st.get('n_harmless')}, coefficient {st.get('coefficient')})",
         st.get("induced_refusal_rate")),
        ("cross_ablation own / other node after (mean)",
         f"{_fmt(metrics.get('cross_ablation', {}).get('own_node_after_mean'))} / "
         f"{_fmt(metrics.get('cross_ablation', {}).get('other_nodes_after_mean'))}"),
        ("sae: tokens / width / k / layer", f"{_fmt(sae.get('tokens'))} / {_fmt(sae.get('width'))} / "
                                            f"{_fmt(sae.get('k'))} / {_fmt(sae.get('layer'))}"),
        ("sae.fvu / l0 / dead_fraction", f"{_fmt(sae.get('fvu'))} / {_fmt(sae.get('l0'))} / "
                                         f"{_fmt(sae.get('dead_fraction'))}"),
        (f"sae.clamp_refusal_own / other (refusal before {_fmt(sae.get('refusal_before'))}, "
         f"n = {_fmt(sae.get('clamp_n'))})",
         f"{_fmt(sae.get('clamp_refusal_own'))} / {_fmt(sae.get('clamp_refusal_other'))}"),
    ]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows]
    findings_path = atlas / "findings.json"
    if findings_path.is_file():
        findings = json.loads(findings_path.read_text()).get("findings", [])
        lines += ["", "Findings (`findings.json`; a rule is trusted only after `refusal-atlas validate` showed it "
                  "giving the planted answer):", ""]
        by_title: dict[str, list[dict[str, Any]]] = {}
        for f in findings:
            by_title.setdefault(str(f.get("title", f.get("question"))), []).append(f)
        for title, group in by_title.items():
            counts: dict[str, int] = {}
            for f in group:
                counts[str(f.get("verdict"))] = counts.get(str(f.get("verdict")), 0) + 1
            tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            lines.append(f"- **{title}** ({len(group)} findings: {tally})")
            for f in group:
                if f.get("verdict") != "inconclusive":
                    mark = "" if f.get("trusted") else " *(rule not yet validated, so read as inconclusive)*"
                    lines.append(f"  - {f.get('sentence', '')}{mark}")
    cells_path = atlas / "harm" / "cells.csv"
    if cells_path.is_file():
        cells = pd.read_csv(cells_path)
        cols = [c for c in ("node", "n_HR", "n_HC", "n_LR", "n_LC", "too_small") if c in cells.columns]
        lines += ["", "Harmfulness vs refusal, the four cells (`harm/cells.csv`):", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in cells[cols].iterrows():
            lines.append("| " + " | ".join(_fmt(r[c]) if not isinstance(r[c], str) else r[c] for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("atlas", type=Path)
    parser.add_argument("--machine", default="the 2-core CPU machine")
    parser.add_argument("--state", default="cold (no output folder)")
    parser.add_argument("--write", type=Path, help="README to update between the results markers")
    args = parser.parse_args()
    block = render(args.atlas, args.machine, args.state)
    if args.write is None:
        print(block, end="")
        return
    text = args.write.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    args.write.write_text(text[:start] + "\n" + block + text[end:])


if __name__ == "__main__":
    main()
