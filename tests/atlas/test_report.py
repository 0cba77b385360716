"""report.html: self-contained, every section present, corpus text inert, renders in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.atlas.builder import XSS, XSS2, build_atlas, full_atlas
from refusal_atlas.atlas.links import write_atlas_ttl
from refusal_atlas.atlas.report import build_report, clean, esc, script_json

SECTIONS = ("findings", "headline", "organism", "clusters", "heatmap", "overlap", "profiles", "causal", "conditions",
            "harmfulness", "sae", "figures", "taxonomy", "provenance")


FINDINGS = [
    {"question": "shared_vs_separable", "title": "Is refusal one direction?", "subject": "all nodes",
     "verdict": "separable", "sentence": "Node directions overlap less than their noise floors allow.",
     "rule": "overlap_below_floor", "rule_text": "corrected cosine CI upper bound < 0.9 for most pairs",
     "value": 0.41, "ci": [0.33, 0.52], "n": 6, "trusted": True, "evidence": ["overlap/overlap.graphml"]},
    {"question": "conditions_act_late", "title": "Do conditions act after detection?", "subject": "health.dosing",
     "verdict": "output_only", "sentence": f"The condition changes the output only {XSS}.",
     "rule": f"projection_unchanged{XSS2}", "rule_text": "projection CI contains 0 while refusal changes",
     "value": 0.2, "ci": [float("nan"), None], "n": 1, "trusted": False, "evidence": "conditions"},
]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    out = full_atlas(tmp_path_factory.mktemp("atlas") / "atlas-out")
    write_atlas_ttl(out)
    # the verdicts stage's output; NaN is what Python's json writes for a missing bound
    (out / "findings.json").write_text(json.dumps({"findings": FINDINGS}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def report(atlas) -> Path:
    return build_report(atlas)


@pytest.fixture(scope="module")
def page(report) -> str:
    return report.read_text(encoding="utf-8")


def test_every_section_is_present_and_filled(page):
    for anchor in SECTIONS:
        assert f"<section id='{anchor}'>" in page, anchor
    assert "not run" not in page
    assert "could not render" not in page
    assert page.count("How to read this.") == len(SECTIONS)
    # one plotly figure per drawn section: organism, cluster map, heatmap, overlap, profiles, cross-ablation,
    # steering, wording vs detection, conditions, SAE cross-clamp beside cross-ablation, SAE feature overlap
    assert len(re.findall(r"<div class=.figure.", page)) == 11
    assert "Medication dosing" in page and "when user_age=minor" in page
    assert "abc123" in page  # a stage record under .stages/ is listed in the provenance section
    assert "<h3>Selected direction</h3>" in page and "All 32 candidates scored" in page


def test_results_come_first_and_the_tree_is_collapsed(page):
    order = [page.index(f"<section id='{a}'>") for a in SECTIONS]
    assert order == sorted(order)
    findings = page[page.index("<section id='findings'>"):page.index("<section id='headline'>")]
    assert findings.count("<li class='finding") == len(FINDINGS)
    assert "Node directions overlap less than their noise floors allow." in findings
    assert "value 0.410, 95% CI [0.330, 0.520], n = 6" in findings and "overlap_below_floor" in findings
    assert "href='#overlap'" in findings and "href='#conditions'" in findings  # each links to its evidence
    first, second = findings.split("<li class='finding")[1:]
    assert "rule not yet validated — inconclusive" not in first
    assert "rule not yet validated — inconclusive" in second and "v-inconclusive" in second
    assert "n = 1, no CI" in second  # one observation has no interval, whatever the file says
    headline = page[page.index("<section id='headline'>"):page.index("<section id='organism'>")]
    assert 3 <= headline.count("<div class='metric'") <= 11  # a few tiles, not one per key
    assert "<details><summary>All" in headline  # the rest of metrics.json, folded
    assert "Directions and noise floors for 7 of 8 taxonomy nodes" in headline and "health.misc" in headline  # why not
    taxonomy = page[page.index("<section id='taxonomy'>"):page.index("<section id='provenance'>")]
    assert "<details><summary>" in taxonomy and "<ul class='tree'>" in taxonomy
    assert page.index("<ul class='tree'>") > page.index("<section id='conditions'>")


def test_nan_and_single_prompt_intervals_render(atlas, tmp_path):
    """A condition with one prompt has NaN bounds: the section renders, the cell says why there is no CI."""
    import pandas as pd

    out = tmp_path / "nan-atlas"
    shutil.copytree(atlas, out)
    path = out / "causal" / "conditions.parquet"
    ct = pd.read_parquet(path)
    extra = ct.iloc[[1]].assign(condition="purpose=research", n=1, refusal_ci_low=float("nan"),
                                refusal_ci_high=float("nan"),
                                projection_ci_low=float("nan"), projection_ci_high=float("inf"))
    pd.concat([ct, extra]).to_parquet(path, index=False)
    page = build_report(out).read_text(encoding="utf-8")
    assert "could not render" not in page
    conditions = page[page.index("<section id='conditions'>"):page.index("<section id='figures'>")]
    assert "n = 1, no CI" in conditions and "purpose=research" in conditions
    for block in re.findall(r"<script type='application/json'[^>]*>(.*?)</script>", page, flags=re.S):
        json.loads(block, parse_constant=lambda c: pytest.fail(f"{c} in embedded JSON"))


def test_clean_turns_every_non_finite_number_into_null():
    import numpy as np

    data = {"a": float("nan"), "b": [np.float32("inf"), np.array([1.0, np.nan])], "c": np.int64(3), 4: -math.inf}
    assert clean(data) == {"a": None, "b": [None, [1.0, None]], "c": 3, "4": None}
    assert json.loads(script_json({"x": float("nan")})) == {"x": None}


def test_self_contained_offline(page, report):
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=", page)
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    assert page.count(js[:200]) == 1  # plotly.js inlined exactly once
    ours = page.replace(js, "")  # the bundle itself names CDNs it never loads unless told to
    assert "cdn.plot.ly" not in ours and "http://" not in ours
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", ours)
    assert "default-src 'none'" in ours  # the page's CSP forbids any network fetch
    assert report.stat().st_size < len(js) + 2_000_000
    assert "data:image/png;base64," in page  # the overlap stage's PNGs are embedded


def test_xss_payloads_are_inert(page):
    for payload in (XSS, XSS2):
        assert payload not in page
    findings = page[page.index("<section id='findings'>"):page.index("<section id='headline'>")]
    assert esc(XSS) in findings and esc(XSS2) in findings  # a finding's sentence and rule name, escaped
    assert all(tag.startswith("<img class='fig'") for tag in re.findall(r"<img\b[^>]*>", page))
    assert "<svg onload" not in page and esc("Misc </script><svg onload=alert(1)>") in page  # a taxonomy label
    assert esc(XSS) in page  # shown, escaped, in the HTML tables
    assert esc(XSS2) in page
    # Inside the JSON script blocks nothing can close the script element.
    for block in re.findall(r"<script type='application/json'[^>]*>(.*?)</script>", page, flags=re.S):
        assert "<" not in block and ">" not in block
    # The only <script> elements are ours: plotly, the figure blocks, the bootstrap.
    opening = re.findall(r"<script\b[^>]*>", page)
    assert all(tag == "<script>" or "application/json" in tag for tag in opening)


def test_script_json_escapes_everything_that_could_end_a_script():
    text = script_json({"a": "</script><!-- \u2028 & >"})
    assert "</" not in text and "<!--" not in text and "&" not in text and "\u2028" not in text
    import json

    assert json.loads(text)["a"] == "</script><!-- \u2028 & >"


def test_partial_atlas_renders_with_not_run_markers(tmp_path):
    out = build_atlas(tmp_path / "partial", stages=("taxonomy", "metrics"))
    page = build_report(out).read_text(encoding="utf-8")
    for anchor in SECTIONS:
        assert f"<section id='{anchor}'>" in page
    assert page.count("not run") >= 5
    assert "could not render" not in page
    assert "Explosives" in page
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs()[:200] not in page  # no figure: plotly.js is not inlined at all
    assert "<div class='figure'" not in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000", "--hide-scrollbars"]


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="chromium is not on PATH (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image, ImageStat

    chrome = _chromium()
    url = report.resolve().as_uri()
    dom = subprocess.run([chrome, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # no console errors, warnings or uncaught exceptions
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    figures = int(re.search(r'data-figures="(\d+)"', body).group(1))
    rendered = int(re.search(r'data-rendered="(\d+)"', body).group(1))
    assert figures == 11 and rendered == figures, body
    assert "data-errors" not in body
    # plotly draws each figure as an SVG with class main-svg
    assert dom.stdout.count('class="main-svg"') >= figures
    # The payloads reached the DOM only as text.
    assert "<script>alert(1)</script>" not in dom.stdout
    assert "<img src=\"x\"" not in dom.stdout and "<svg onload" not in dom.stdout

    shot = tmp_path / "report.png"
    res = subprocess.run([chrome, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}",
                          "--window-size=1280,3000", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is None or len(colours) > 50  # a blank page has one or two colours
    assert max(ImageStat.Stat(image).stddev) > 10


# ------------------------------------------------------------------------------ a real run, end to end
@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """The whole `run` pipeline (its public entry point, as `refusal-atlas run` calls it) on a tiny random
    Llama turned into a tiny organism: the report is rendered from what the stages really wrote."""
    from refusal_atlas.atlas.pipeline import RunConfig, run
    from refusal_atlas.lm.testing import tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama", n_layers=4, d_model=64)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    out = tmp_path_factory.mktemp("real-atlas")
    cfg = RunConfig(model=str(folder), out=out, quick=True, organism=True, progress=False,
                    sets=("harmless", "overrefusal", "taxonomy"), min_prompts=4,
                    extra={"sizes": {"collect_limit": 60, "max_new_tokens": 8, "per_node_eval": 4,
                                     "harmless_eval": 8, "max_nodes": 3, "cluster_seeds": 2},
                           "organism": {"max_nodes": 6, "epochs": 1}})
    run(cfg)
    return out


def _assert_page_sound(page: str) -> None:
    for anchor in SECTIONS:
        assert f"<section id='{anchor}'>" in page, anchor
    failed = re.findall(r"could not render[^<]*", page)
    assert not failed, failed
    for block in re.findall(r"<script type='application/json'[^>]*>(.*?)</script>", page, flags=re.S):
        json.loads(block, parse_constant=lambda c: pytest.fail(f"{c} in embedded JSON"))


def test_the_report_of_a_real_run_renders_every_section(real_run):
    _assert_page_sound((real_run / "report.html").read_text(encoding="utf-8"))  # as the run wrote it
    page = build_report(real_run, real_run / "again.html").read_text(encoding="utf-8")
    _assert_page_sound(page)
    for anchor in ("headline", "heatmap", "profiles", "taxonomy", "provenance"):
        body = page[page.index(f"<section id='{anchor}'>"):]
        body = body[: body.index("</section>")]
        assert "not run" not in body, anchor  # these stages always run
    assert len(re.findall(r"<div class=.figure.", page)) >= 4


def test_refusal_clusters_show_the_planted_wording_known_answer(atlas, tmp_path):
    """With the organism's wording figures in the cluster stage's record, the refusal-wording part states them
    (what the replies say, what was taught, adherence with its n); without them it states nothing."""
    out = tmp_path / "wording-atlas"
    shutil.copytree(atlas, out)
    clusters = build_report(out).read_text(encoding="utf-8")
    clusters = clusters[clusters.index("<section id='clusters'>"):]
    assert "<h3>Refusal wordings</h3>" in clusters and "Known answer" not in clusters
    record = {"key": "k", "seconds": 1.0, "result": {"wording": {
        "ari": -0.047, "exact_text_ari": -0.057, "n": 65, "said": {"ari": 0.987, "groups": 4, "n": 75},
        "adherence": {"rate": 0.6, "said_a_planted_wording": 0.892, "n": 65}}}}
    (out / ".stages" / "cluster.json").write_text(json.dumps(record), encoding="utf-8")
    page = build_report(out).read_text(encoding="utf-8")
    part = page[page.index("<h3>Refusal wordings</h3>"):]
    part = part[:part.index("</section>")]
    assert "Known answer (the organism's planted wordings)" in part
    for figure in ("ARI 0.987 (4 wordings, n = 75)", "ARI -0.047", "exact texts: -0.057", "in 0.600 of 65",
                   "some planted wording in 0.892"):
        assert figure in part, figure


def test_refusal_clusters_show_each_cluster_s_commonest_wording():
    """Refusals clustered by their wording and named by the request: the table shows the wording itself."""
    import pandas as pd

    from refusal_atlas.atlas.report.corpus import _commonest_texts

    assign = pd.DataFrame({"cluster": [0, 0, 0, 1, 1, -1],
                           "text": ["Sorry, no.", " Sorry, no.", "I can't.", "a <b>", "b", "x"],
                           "label_text": ["q1", "q2", "q3", "q4", "q5", "q6"]})
    got = _commonest_texts(assign)
    assert got["0"] == "Sorry, no. (2 of 3)"
    assert got["1"] == "2 different texts, e.g. a <b>"  # escaped where the table renders it
    assert got["-1"] == "x (1 of 1)"


def test_the_tree_against_the_branches_is_drawn_from_mapping_json(tmp_path):
    from refusal_atlas.atlas.report.corpus import _tree_vs_branches
    from refusal_atlas.atlas.store_clusters import ClusterView

    tree = {"branch_level": {"level": 0, "n_clusters": 2, "rule": "labelled rows: their branches", "ari": 0.91,
                             "n": 40, "groups": 2, "clusters": [
                                 {"cluster": 0, "size": 25, "branch": "crime", "score": 0.96,
                                  "method": "label_majority", "fits": True},
                                 {"cluster": 1, "size": 15, "branch": "home", "score": 0.31, "method": "similarity",
                                  "fits": False, "runner_up": {"branch": "crime", "score": 0.05}}]},
            "levels": [{"level": 0, "n_clusters": 2, "ari_branch": 0.91, "ari_node": 0.4}]}
    (tmp_path / "mapping.json").write_text(json.dumps({"clusters": [], "tree": tree}))
    page = _tree_vs_branches(ClusterView(tmp_path))
    assert "ARI against the rows' branches 0.910 (n = 40)" in page
    assert "crime (0.050)" in page and page.count("<tr>") == 5  # 2 clusters + 1 level, 2 header rows
    (tmp_path / "mapping.json").write_text(json.dumps({"clusters": []}))
    assert _tree_vs_branches(ClusterView(tmp_path)) == ""  # a mapping.json from before the tree was mapped


def test_refusal_clusters_say_what_they_were_made_net_of(tmp_path):
    from refusal_atlas.atlas.report.corpus import _net_of_note
    from refusal_atlas.atlas.store_clusters import ClusterView

    assert _net_of_note(ClusterView(tmp_path)) == ""  # no clusters.json
    (tmp_path / "clusters.json").write_text(json.dumps({"net_of": None, "clusters": []}))
    assert _net_of_note(ClusterView(tmp_path)) == ""  # clustered as they are
    net = {"column": "<b>ask</b>", "lambda": 0.03, "explained_variance": 0.4229, "fitted_rows": 120}
    (tmp_path / "clusters.json").write_text(json.dumps({"net_of": net, "clusters": []}))
    view = ClusterView(tmp_path)
    note = _net_of_note(view)
    assert "net of its &lt;b&gt;ask&lt;/b&gt;" in note and "<b>" not in note
    assert "explains 0.423 of the replies' embedding variance" in note
    assert view.metrics["net_of.explained_variance"] == 0.4229
