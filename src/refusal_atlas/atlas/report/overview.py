"""The report's first and last screens: findings, headline tiles, the taxonomy tree, provenance.

Findings come first: one sentence per question, with the verdict, its number, interval, n and
rule, linked to the section that holds the evidence. A finding whose rule has not yet given the
right answer on the known-answer organisms (`trusted: false`) is shown as inconclusive.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from refusal_atlas.atlas.query.common import selected_layer_position
from refusal_atlas.atlas.report.html import (
    ci_text,
    esc,
    flatten,
    fmt,
    html_table,
    is_missing,
    not_run,
    safe_class,
)
from refusal_atlas.atlas.store import AtlasStore
from refusal_atlas.atlas.verdict_figures import FindingText
from refusal_atlas.errors import AtlasError
from refusal_atlas.taxonomy.resolve import default_behaviour, format_when

FINDINGS_FILE = "findings.json"
MAX_PNG_BYTES = 1_500_000
MAX_PNG_TOTAL = 6_000_000
UNTRUSTED = "rule not yet validated — inconclusive"

# The few figures a reader needs first, in reading order, each with what it means.
HEADLINE = {
    "organism.heldout_refusal_rate": "held-out prompts whose policy is refuse that the organism refused",
    "organism.harmless_refusal_rate": "harmless held-out prompts refused (over-refusal)",
    "organism.permitted_compliance_rate": "held-out prompts a condition permits that were answered",
    "ablation.refusal_before": "refusal rate on held-out harmful prompts, no intervention",
    "ablation.refusal_after": "the same with the pooled refusal direction ablated",
    "ablation.harmless_kl": "KL caused by that ablation on the harmless prompts the model answers (capability cost)",
    "steering.induced_refusal_rate": "harmless prompts refused when the pooled direction is added",
    "directions.nodes_with_directions": "taxonomy nodes with a direction and noise floors (every node with enough "
                                        "harmful training prompts, at every depth)",
    "directions.median_noise_floor": "median split-half cosine of the branch directions (near 1: reproducible)",
    "clusters.seed_ari": "agreement of clusterings across seeds (ARI)",
    "clusters.node_ari": "agreement of clusters with taxonomy nodes (ARI)",
    "detector.f1": "refusal detector F1 on the human-labelled refusals",
}

# Where the evidence for a finding is drawn, by the words its `evidence` names.
EVIDENCE_ANCHORS = (
    ("condition", "conditions"), ("cross", "causal"), ("ablat", "causal"), ("steer", "causal"),
    ("wording", "causal"), ("select", "causal"), ("causal", "causal"), ("overlap", "overlap"),
    ("heatmap", "heatmap"), ("cos", "heatmap"), ("profile", "profiles"), ("layer", "profiles"),
    ("direction", "profiles"), ("cluster", "clusters"), ("organism", "organism"), ("adherence", "organism"),
    ("metric", "headline"),
)


@dataclass
class Finding(FindingText):
    """One question's answer as the verdicts stage wrote it (findings.json), as the report reads it back."""

    value: Any
    ci: tuple[Any, Any] | None
    n: Any
    trusted: bool
    evidence: list[str]


def _text(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    return "" if value is None else str(value)


def load_findings(store: AtlasStore) -> list[Finding] | None:
    """The findings of `<atlas>/findings.json`, None when the file is absent."""
    path = store.findings_file
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtlasError(f"{path}: unreadable ({exc}); rerun `refusal-atlas run`") from exc
    items = data.get("findings") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise AtlasError(f"{path}: expected {{\"findings\": [...]}}; rerun `refusal-atlas run`")
    out = []
    for i, raw in enumerate(items):
        if not isinstance(raw, dict):
            raise AtlasError(f"{path}: finding {i} is not an object")
        ci = raw.get("ci")
        evidence = raw.get("evidence")
        if isinstance(evidence, dict):
            evidence = [str(v) for v in evidence.values()] + [str(k) for k in evidence]
        elif isinstance(evidence, str):
            evidence = [evidence]
        out.append(Finding(
            question=_text(raw, "question"), title=_text(raw, "title"), subject=_text(raw, "subject"),
            verdict=_text(raw, "verdict") or "inconclusive", sentence=_text(raw, "sentence"),
            rule=_text(raw, "rule"), rule_text=_text(raw, "rule_text"), value=raw.get("value"),
            ci=(ci[0], ci[1]) if isinstance(ci, list | tuple) and len(ci) == 2 else None, n=raw.get("n"),
            trusted=raw.get("trusted") is True, evidence=[str(e) for e in evidence or []],
        ))
    return out


def evidence_anchor(finding: Finding, anchors: set[str]) -> str | None:
    """The report section that holds a finding's evidence (an anchor named outright, else by keyword)."""
    for item in finding.evidence:
        if item in anchors:
            return item
    words = " ".join([*finding.evidence, finding.question, finding.rule]).lower()
    for word, anchor in EVIDENCE_ANCHORS:
        if word in words and anchor in anchors:
            return anchor
    return None


def _number_text(f: Finding) -> str:
    parts = [] if is_missing(f.value) or f.value is None else [f"value {fmt(f.value)}"]
    interval = ci_text(f.ci[0], f.ci[1], f.n) if f.ci is not None else ci_text(None, None, f.n)
    if interval != "–":
        parts.append(interval if interval.startswith("n =") else f"95% CI {interval}")
    if not is_missing(f.n) and f.n is not None and not interval.startswith("n ="):
        parts.append(f"n = {fmt(f.n)}")
    return ", ".join(parts)


def section_findings(store: AtlasStore, anchors: set[str]) -> str:
    findings = load_findings(store)
    if findings is None:
        return not_run(FINDINGS_FILE, "refusal-atlas run (verdicts stage)")
    if not findings:
        return "<p>The verdicts stage wrote no finding.</p>"
    items = []
    for f in findings:
        anchor = evidence_anchor(f, anchors)
        link = f" <a class='evidence' href='#{anchor}'>evidence</a>" if anchor else ""
        verdict = f.verdict if f.trusted else "inconclusive"
        status = ("" if f.trusted else f" <span class='untrusted'>{esc(UNTRUSTED)}</span>"
                  f" <span class='small'>(the rule would say: {esc(f.verdict)})</span>")
        sentence = f.sentence or f"{f.title}: {f.verdict}"
        rule = f" rule <code title='{esc(f.rule_text)}'>{esc(f.rule)}</code>" if f.rule else ""
        numbers = _number_text(f)
        items.append(
            f"<li class='finding v-{safe_class(verdict)}'><b>{esc(f.title or f.question)}</b> "
            f"<span class='verdict'>{esc(verdict)}</span>{status}<br>{esc(sentence)}"
            f"<div class='small'>{esc(numbers)}{';' if numbers and rule else ''}{rule}"
            f"{' — ' + esc(f.rule_text) if f.rule_text else ''}{link}</div></li>")
    return f"<ol class='findings'>{''.join(items)}</ol>"


# ------------------------------------------------------------------------------------ headline figures
def section_headline(store: AtlasStore) -> str:
    flat = flatten(store.metrics)
    if not flat:
        return not_run("metrics.json")
    tiles = [f"<div class='metric' title='{esc(help_text)}'><div class='v'>{esc(fmt(flat[key]))}</div>"
             f"<div class='k'>{esc(key)}</div><div class='small'>{esc(help_text)}</div></div>"
             for key, help_text in HEADLINE.items() if key in flat and not isinstance(flat[key], dict | list)]
    rows = [(k, json.dumps(v) if isinstance(v, list) else v) for k, v in flat.items()]
    coverage = _coverage(store)
    more = (f"<details><summary>All {len(flat)} figures of metrics.json</summary>"
            f"{html_table(['metric', 'value'], rows, max_rows=300)}</details>")
    return (f"<div class='metrics'>{''.join(tiles)}</div>" if tiles else "") + coverage + more


def _coverage(store: AtlasStore) -> str:
    """Which taxonomy nodes have directions (branch set, tree set), and why the others do not."""
    tax = store.taxonomy
    if tax is None or store.directions is None:
        return ""
    analysed = store.analysed_nodes
    branches = list(store.directions.nodes)
    records = {str(r.get("node")): r for r in store.coverage}
    missing = [n for n in tax.nodes if n not in analysed]
    min_prompts = (store.manifest.get("parameters") or {}).get("min_prompts", "min_prompts")
    rows = []
    for n in missing:
        r = records.get(n, {})
        rows.append((n, r.get("harmful_prompts"), r.get("train_prompts"),
                     r.get("reason") or f"fewer than {min_prompts} harmful training prompts", r.get("fallback")))
    rows.sort(key=lambda row: (-(row[2] or 0), row[0]))
    table = html_table(["node", "harmful prompts", "training prompts", "why not analysed", "answered by ancestor"],
                       rows, max_rows=300)
    tree = [n for n in analysed if n not in branches]
    return (f"<p class='small'><b>Coverage.</b> Directions and noise floors for {len(analysed)} of {len(tax.nodes)} "
            f"taxonomy nodes: every node with at least {esc(min_prompts)} harmful training prompts (its own and its "
            f"descendants'). {len(branches)} branches carry the causal tests ({esc(', '.join(branches))}); "
            f"{len(tree)} more nodes at every depth have directions and floors only "
            f"({esc(', '.join(tree)) or 'none'}). <code>refusal-atlas query node ID</code> answers for any other "
            "node with its nearest analysed ancestor.</p>"
            f"<details><summary>The {len(missing)} nodes without a direction, and why</summary>{table}</details>")


# ------------------------------------------------------------------------------------ taxonomy
def _badge(text: str) -> str:
    return f"<span class='badge b-{safe_class(text)}'>{esc(text.replace('_', ' '))}</span>"


def node_reliability(store: AtlasStore) -> dict[str, float]:
    """Each node's direction reliability at the selected layer and position (else its best over layers)."""
    dm = store.direction_metrics
    if dm is None or "reliability" not in dm.columns:
        return {}
    chosen = selected_layer_position(store)
    if chosen is not None:
        at = dm[(dm["layer"] == chosen[0]) & (dm["position"] == chosen[1])].dropna(subset=["reliability"])
        return {str(k): float(v) for k, v in zip(at["node"], at["reliability"], strict=True)}
    best = dm.dropna(subset=["reliability"]).groupby("node")["reliability"].max()
    return {str(k): float(v) for k, v in best.items()}


def section_taxonomy(store: AtlasStore) -> str:
    tax = store.taxonomy
    if tax is None:
        return not_run("taxonomy.ttl", "refusal-atlas run (or ontology export)")
    rel = node_reliability(store)
    seen: set[str] = set()

    def item(node_id: str) -> str:
        node = tax.nodes[node_id]
        parts = [f"<b>{esc(node.label)}</b> <code>{esc(node_id)}</code>",
                 _badge(default_behaviour(tax, node_id).value)]
        if node.status.value != "accepted":
            parts.append(_badge(node.status.value))
        if node_id in rel:
            parts.append(f" <span class='small'>direction reliability {esc(fmt(rel[node_id]))}</span>")
        elif rel:
            parts.append(" <span class='small'>no direction</span>")
        rules = "".join(f"<div>when {esc(format_when(r.when))} → {_badge(r.expect.value)}"
                        f"{' — ' + esc(r.rationale) if r.rationale else ''}</div>" for r in node.conditions)
        kids = "" if node_id in seen else "".join(item(c.id) for c in tax.children(node_id))
        seen.add(node_id)
        inner = f"<ul>{kids}</ul>" if kids else ""
        rules_html = f"<div class='rules'>{rules}</div>" if rules else ""
        return f"<li>{''.join(parts)}{rules_html}{inner}</li>"

    tree = "".join(item(r.id) for r in tax.roots())
    n_cond = sum(1 for n in tax.nodes.values() if n.conditions)
    summary = (f"{esc(tax.scheme.title)} {esc(tax.scheme.version)}: {len(tax.nodes)} nodes, "
               f"{n_cond} with condition rules")
    return f"<details><summary>{summary} (click to open the tree)</summary><ul class='tree'>{tree}</ul></details>"


# ------------------------------------------------------------------------------------ figures, provenance
def section_figures(store: AtlasStore) -> str:
    imgs, total = [], 0
    for path in store.figures():
        size = path.stat().st_size
        rel = esc(path.relative_to(store.root))
        if size > MAX_PNG_BYTES or total + size > MAX_PNG_TOTAL:
            imgs.append(f"<p class='small'>{rel} not embedded ({size // 1024} KiB); open it beside the report.</p>")
            continue
        total += size
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        imgs.append(f"<figure><img class='fig' alt='{rel}' src='data:image/png;base64,{data}'>"
                    f"<figcaption class='small'>{rel}</figcaption></figure>")
    return "".join(imgs) or "<p class='small'>No PNG figures were written by the stages.</p>"


def section_provenance(store: AtlasStore) -> str:
    man, records = store.manifest, store.stage_records
    if not man and not records:
        return not_run("manifest.json")
    parts = []
    if records:
        parts.append("<h3>Stages</h3>" + html_table(
            ["stage", "seconds (when run)", "cache key"],
            [(name, rec.get("seconds"), rec.get("key")) for name, rec in records.items()]))
    if man:
        rows = [(k, json.dumps(v) if isinstance(v, list) else v) for k, v in flatten(man).items()]
        parts.append("<details><summary>Manifest</summary>" + html_table(["key", "value"], rows, max_rows=300)
                     + "</details>")
    return "".join(parts)
