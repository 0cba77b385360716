"""Assemble report.html: the sections in reading order, the page shell, the atomic write.

Results come first (findings, then the few headline figures), the evidence sections follow in
the order the findings cite them, and the long reference material (stage figures, the taxonomy
tree, provenance) sits at the end, collapsed. Each section renders when its stage's output
exists and says "not run" otherwise, so the report can be built after any prefix of the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from plotly.offline import get_plotlyjs

from refusal_atlas.atlas.report.causal import section_causal, section_conditions
from refusal_atlas.atlas.report.corpus import section_clusters, section_organism
from refusal_atlas.atlas.report.geometry import section_heatmap, section_overlap, section_profiles
from refusal_atlas.atlas.report.harm import section_harm
from refusal_atlas.atlas.report.html import Figures, esc
from refusal_atlas.atlas.report.overview import (
    section_figures,
    section_findings,
    section_headline,
    section_provenance,
    section_taxonomy,
)
from refusal_atlas.atlas.report.sae import SAE_HOW, SAE_TITLE, section_sae
from refusal_atlas.atlas.store import AtlasStore, model_identity
from refusal_atlas.atlas.store_read import portable_model
from refusal_atlas.io import atomic_write_text

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

Section = tuple[str, str, str, str]  # (anchor, title, how-to-read, body html)

HOW = {
    "findings": "One answer per question the atlas asks, each decided by a stated rule over a figure, its 95% "
                "interval and its sample size; the link leads to the section holding the evidence. A rule is "
                "trusted only after it gave the right answer on model organisms with a planted answer; until "
                "then its finding is shown as inconclusive.",
    "headline": "The few figures that say whether the run can be believed: does the model organism follow the "
                "policy, is the pooled direction necessary (ablation) and sufficient (steering) for refusal, how "
                "noisy are the node directions and how stable are the clusters. Every other figure of "
                "metrics.json is in the table below the tiles.",
    "organism": "The model organism was fine-tuned to follow the taxonomy's conditional policy; here is how it "
                "behaves on held-out prompts it never saw. Refusal should be high where the policy says refuse, "
                "low on harmless prompts and where a condition permits answering.",
    "clusters": "Bottom-up: the corpus embedded and clustered (consensus over seeds). Each point is one text "
                "(hover to read it); the table gives each cluster's best-matching taxonomy node with its score "
                "(label majority where rows carry nodes, similarity to node definitions otherwise). Clusters "
                "that fit no node are written as proposed nodes. Seed ARI near 1 means the clustering is stable; "
                "node ARI says how far bottom-up clusters agree with the top-down taxonomy.",
    "heatmap": "Cosine similarity between the refusal directions of every pair of nodes at one layer (use the "
               "menu to change layer; it opens at the causally selected layer). The diagonal is each node's noise "
               "floor: the cosine between directions from two random halves of its own prompts. A between-node "
               "cosine close to both nodes' floors means the two are indistinguishable given the data; well "
               "below them means they differ.",
    "overlap": "Nodes are the branches that carry the causal tests, at the causally selected layer and position "
               "(the same as the heatmap's opening layer and the cross-ablation's). An edge means their directions "
               "overlap significantly more than noise explains: the bootstrap 95% lower bound of the "
               "noise-corrected cosine is above 0 (edge weight = raw cosine). The table gives each number with its "
               "own interval: the raw cosine, and the noise-corrected cosine that decides the edge (an upper bound "
               "below 1 means the two are distinguishable). The effective rank of the node directions says how "
               "many independent directions they span (1 = one shared direction).",
    "profiles": "Per node and layer: reliability (split-half, Spearman–Brown corrected), the direction's norm "
                "(how far the node's prompts sit from harmless ones), and where available the AUROC of separating "
                "the node from harmless prompts. Detection usually rises in middle layers.",
    "causal": "Ablating one node's direction and measuring refusal on every node's prompts: a row that drops "
              "refusal everywhere is a shared mechanism; a drop on the diagonal only is node-specific. Rows marked "
              "[residual] ablate what is left of a node's direction once the pooled direction is projected out. "
              "Steering adds a direction to harmless prompts: a high induced rate means the direction suffices "
              "for refusal. Wording vs detection: a probe's accuracy for telling nodes apart (detection) against "
              "how strongly directions promote refusal-opening tokens through the logit lens (wording), by layer.",
    "conditions": "For nodes with condition rules: refusal rate under each condition value with its confidence "
                  "interval and, where measured, the projection onto the node's direction. A changed refusal "
                  "with an unchanged projection means the condition acts after detection (on the output). A row "
                  "with a single prompt has no interval (\"n = 1, no CI\").",
    "harmfulness": "Is harmfulness represented apart from refusal? Prompts fall in four cells (harmful or harmless, "
                   "refused or answered); a harmfulness direction (last instruction token) and a refusal direction "
                   "(last template token) are estimated per branch with split-half floors, and every group "
                   "(jailbreak-wrapped, rephrased, over-refused) is projected onto both.",
    "sae": SAE_HOW,
    "figures": "Static figures written by the stages, embedded as images.",
    "taxonomy": "The harm-source taxonomy the atlas was built from (open the tree). Each node shows its default "
                "expected behaviour (inherited from the parent when not stated) and its condition rules: when the "
                "stated context holds, the expected behaviour changes. The reliability is the split-half "
                "reliability of the node's direction at the causally selected layer and position.",
    "provenance": "Versions, seeds, parameters and timings of the run (manifest.json).",
}

TITLES = {
    "findings": "Findings", "headline": "Headline figures", "organism": "Model organism: adherence to the policy",
    "clusters": "Cluster map", "heatmap": "Cosine heatmap with noise floors", "overlap": "Overlap graph",
    "profiles": "Layer profiles", "causal": "Cross-ablation matrix and steering", "conditions": "Condition table",
    "harmfulness": "Harmfulness vs refusal (the 2×2)", "sae": SAE_TITLE, "figures": "Stage figures",
    "taxonomy": "Taxonomy tree with conditions", "provenance": "Provenance",
}
ANCHORS = tuple(TITLES)


def _guarded(fn: Callable[[], str], what: str) -> str:
    try:
        return fn()
    except Exception as exc:  # one bad artefact must not take the whole report down
        return f"<p class='notrun'>could not render {esc(what)}: {esc(type(exc).__name__)}: {esc(exc)}</p>"


def build_sections(store: AtlasStore, figs: Figures) -> list[Section]:
    builders: dict[str, Callable[[], str]] = {
        "findings": lambda: section_findings(store, set(ANCHORS)),
        "headline": lambda: section_headline(store),
        "organism": lambda: section_organism(store, figs),
        "clusters": lambda: section_clusters(store, figs),
        "heatmap": lambda: section_heatmap(store, figs),
        "overlap": lambda: section_overlap(store, figs),
        "profiles": lambda: section_profiles(store, figs),
        "causal": lambda: section_causal(store, figs),
        "conditions": lambda: section_conditions(store, figs),
        "harmfulness": lambda: section_harm(store),
        "sae": lambda: section_sae(store, figs),
        "figures": lambda: section_figures(store),
        "taxonomy": lambda: section_taxonomy(store),
        "provenance": lambda: section_provenance(store),
    }
    return [(a, TITLES[a], HOW[a], _guarded(builders[a], TITLES[a])) for a in ANCHORS]


def render_html(store: AtlasStore) -> str:
    """The whole report as one HTML string."""
    figs = Figures()
    sections = build_sections(store, figs)
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    boot = (TEMPLATES / "report.js").read_text(encoding="utf-8")
    model = model_identity(store.directions_meta, store.manifest)[0] if store.directions_meta else \
        str(store.manifest.get("model") or "unknown model")
    model = portable_model(model, store.root)  # the organism as organism/model, not this machine's path
    created = store.manifest.get("created_at") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    nav = "".join(f"<a href='#{a}'>{esc(t)}</a>" for a, t, _, _ in sections)
    body = "".join(
        f"<section id='{a}'><h2>{esc(t)}</h2><p class='how'><b>How to read this.</b> {esc(how)}</p>{content}</section>"
        for a, t, how, content in sections
    )
    plotly_js = get_plotlyjs() if figs.blocks else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline' 'unsafe-eval'; font-src data:\">"
        f"<title>refusal-atlas report: {esc(model)}</title><style>{css}</style></head><body>"
        f"<header><h1>refusal-atlas</h1><p>Which refusal mechanisms correspond to which sources of harm in "
        f"<b>{esc(model)}</b> — atlas <code>{esc(store.root.name)}</code>, {esc(created)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main>"
        + (f"<script>{plotly_js}</script>" if plotly_js else "")
        + "".join(figs.blocks)
        + f"<script>{boot}</script></body></html>"
    )


def build_report(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write `<out>/report.html` (or `path`) atomically and return its path."""
    store = AtlasStore.open(out_dir)
    target = Path(path) if path is not None else store.root / "report.html"
    atomic_write_text(target, render_html(store))
    return target
