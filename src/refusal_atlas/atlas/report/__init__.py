"""report.html: one self-contained page that works offline, built from an atlas folder.

Everything is inline: plotly.js once, each figure's JSON in a `<script type="application/json">`
block, PNG figures the stages wrote as base64 data URIs, the CSS and the small bootstrap script
from `atlas/templates/`. No CDN, no network.

Modules: `html` (escaping, the number sanitizer, tables, figure blocks), `overview` (findings,
headline figures, taxonomy, provenance), `corpus` (organism, clusters), `geometry` (heatmap,
overlap, layer profiles), `causal` (selection, cross-ablation, steering, wording, conditions),
`page` (section order, page shell, atomic write).
"""

from __future__ import annotations

from refusal_atlas.atlas.report.html import Figures, clean, df_table, esc, html_table, not_run, script_json
from refusal_atlas.atlas.report.overview import Finding, load_findings
from refusal_atlas.atlas.report.page import ANCHORS, build_report, build_sections, render_html

__all__ = ["ANCHORS", "Figures", "Finding", "build_report", "build_sections", "clean", "df_table", "esc",
           "html_table", "load_findings", "not_run", "render_html", "script_json"]
