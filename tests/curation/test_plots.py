"""Plots: self-contained HTML (no CDN), untrusted text escaped in hover labels."""

from __future__ import annotations

import numpy as np

from refusal_atlas.curation import plots

XSS = ['<script>alert("x")</script>', "<img src=x onerror=alert(1)>", "plain & simple"]


def test_map_escapes_untrusted_text_and_works_offline(tmp_path):
    xy = np.array([[0, 0], [1, 1], [2, 0]], dtype=np.float32)
    fig = plots.cluster_map(xy, np.array([0, 0, -1]), XSS, {0: ["<b>kw</b>"]}, title="<i>t</i>")
    path = plots.write_figure(fig, tmp_path / "map.html")
    html = path.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>kw</b>" not in html
    assert "&lt;script&gt;alert" in html or "\\u0026lt;script\\u0026gt;" in html
    assert "<script src=\"http" not in html and "plotly.js" in html.lower()
    assert len(html) > 1_000_000  # plotly.js inlined


def test_escape_hover_shortens_and_escapes():
    out = plots.escape_hover("<" * 1000, limit=20)
    assert "<" not in out.replace("<br>", "") and out.count("&lt;") == 19


def test_sizes_and_stability_charts(tmp_path):
    sizes = {0: 30, 1: 12, -1: 3}
    plots.write_figure(plots.sizes_chart(sizes, {0: ["a"], 1: ["b"]}), tmp_path / "sizes.html")
    stability = {"per_cluster": {"0": {"seed_jaccard": 1.0, "resample_jaccard": 0.9},
                                 "1": {"seed_jaccard": 0.8, "resample_jaccard": 0.7}},
                 "min_cluster_size_sweep": [{"min_cluster_size": 5, "n_clusters": 3, "outlier_fraction": 0.1}],
                 "seeds": {"pairwise_ari": {"mean": 0.95}}, "resamples": {"ari_vs_reference": {"mean": 0.9}}}
    fig = plots.stability_chart(stability, {0: ["a"]})
    assert "0.950" in fig.layout.title.text
    assert plots.write_figure(fig, tmp_path / "stability.html").stat().st_size > 0


def test_stability_chart_says_what_an_empty_or_one_cluster_ari_measures():
    empty = {"seeds": {"pairwise_ari": {"mean": None}}, "resamples": {"ari_vs_reference": {"mean": None}}}
    assert "–" in plots.stability_chart(empty, {}).layout.title.text  # was a TypeError on None
    one = {"per_cluster": {"0": {"seed_jaccard": 1.0, "resample_jaccard": 1.0}},
           "seeds": {"pairwise_ari": {"mean": 1.0}}, "resamples": {"ari_vs_reference": {"mean": 1.0}}}
    assert "only which rows are outliers" in plots.stability_chart(one, {0: ["a"]}).layout.title.text
