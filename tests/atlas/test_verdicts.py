"""The verdict rules on synthetic figure tables with planted answers, and findings.json from a real atlas folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fixtures.atlas.builder import build_atlas
from refusal_atlas.atlas.verdict_figures import Figures, difference_ci, ratio_bootstrap, read_figures, wilson
from refusal_atlas.atlas.verdict_rules import INCONCLUSIVE, NO_REFUSAL, SEPARABLE, SHARED, acting_bands
from refusal_atlas.atlas.verdicts import QUESTIONS, decide, verdict_metrics, write_findings


def _cross(baseline: dict[str, float], after: dict[tuple[str, str], float], n: int = 24) -> pd.DataFrame:
    rows = [{"source": "none", "target": t, "rate": r, "n": n} for t, r in baseline.items()]
    rows += [{"source": s, "target": t, "rate": r, "n": n} for (s, t), r in after.items()]
    return pd.DataFrame(rows)


def _by(findings, question):
    return {f.subject: f for f in findings if f.question == question}


# ------------------------------------------------------------------------------------------ intervals


def test_wilson_and_newcombe_intervals_hold_at_the_edges():
    lo, hi = wilson(1.0, 1)
    assert 0.0 < lo < 0.3 and hi == pytest.approx(1.0)
    lo, hi = wilson(0.0, 24)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.1 < hi < 0.15
    assert all(math.isnan(x) for x in wilson(0.5, 0))
    d_lo, d_hi = difference_ci(0.9, 100, 0.1, 100)
    assert 0.65 < d_lo < 0.8 < d_hi < 0.9  # Newcombe 1998, method 10: about 0.80 +- 0.1
    point, (b_lo, b_hi) = ratio_bootstrap((1.0, 24, 0.0, 24), (1.0, 24, 0.0, 24))
    assert point == 1.0 and b_lo <= 1.0 <= b_hi


# ------------------------------------------------------------------------------------------ (a)


def test_planted_shared_mechanism_is_found_for_every_pair():
    nodes = ["a", "b", "c"]
    fig = Figures(cross=_cross({n: 1.0 for n in nodes}, {(s, t): 0.04 for s in nodes for t in nodes}))
    found = _by(decide(fig), "shared-vs-separable")
    assert set(found) == {"a and b", "a and c", "b and c"}
    for f in found.values():
        assert f.verdict == SHARED and f.rule == "component-removal"
        assert f.ci is not None and f.ci[0] >= 0.5 and f.n == 48
        assert "95% CI" in f.sentence and "n = 48" in f.sentence and "[rule component-removal]" in f.sentence


def _separable_cross(cross_rate: float = 0.96, n: int = 24) -> pd.DataFrame:
    return _cross({"a": 1.0, "b": 1.0}, {("a", "a"): 0.0, ("b", "b"): 0.04, ("a", "b"): cross_rate,
                                         ("b", "a"): cross_rate}, n=n)


def test_planted_separable_components_with_distinct_directions():
    cos = pd.DataFrame([{"a": "a", "b": "b", "cos": 0.3, "ci_low": 0.2, "ci_high": 0.4, "floor": 0.9}])
    (f,) = _by(decide(Figures(cross=_separable_cross(), cosines=cos)), "shared-vs-separable").values()
    assert f.verdict == SEPARABLE and f.ci is not None and f.ci[1] <= 0.5
    assert "below the floor 0.90" in f.sentence


def test_separable_cross_ablation_with_directions_inside_the_noise_floor_is_inconclusive():
    cos = pd.DataFrame([{"a": "a", "b": "b", "cos": 0.93, "ci_low": 0.9, "ci_high": 0.97, "floor": 0.9}])
    (f,) = _by(decide(Figures(cross=_separable_cross(), cosines=cos)), "shared-vs-separable").values()
    assert f.verdict == INCONCLUSIVE and "split-half floor" in f.sentence


def test_half_removal_on_few_prompts_is_inconclusive():
    (f,) = _by(decide(Figures(cross=_separable_cross(cross_rate=0.5, n=6))), "shared-vs-separable").values()
    assert f.verdict == INCONCLUSIVE


def test_an_own_ablation_that_removes_nothing_cannot_decide():
    fig = Figures(cross=_cross({"a": 1.0, "b": 1.0}, {("a", "a"): 0.95, ("b", "b"): 0.0, ("a", "b"): 0.0,
                                                      ("b", "a"): 0.95}))
    (f,) = _by(decide(fig), "shared-vs-separable").values()
    assert f.verdict == INCONCLUSIVE and "own direction" in f.sentence


def test_a_node_that_never_refuses_is_no_refusal_and_joins_no_pair():
    fig = Figures(cross=_cross({"a": 1.0, "b": 1.0, "c": 0.0}, {(s, t): 0.0 for s in "abc" for t in "abc"}))
    found = _by(decide(fig), "shared-vs-separable")
    assert found["c"].verdict == NO_REFUSAL
    assert set(found) == {"a and b", "c"} and found["a and b"].verdict == SHARED


def test_one_refusing_node_and_one_unclear_node_give_no_pair():
    fig = Figures(cross=_cross({"a": 1.0, "b": 0.33}, {}, n=6))
    found = _by(decide(fig), "shared-vs-separable")
    assert found["b"].verdict == INCONCLUSIVE and found["all nodes"].verdict == INCONCLUSIVE
    assert "1 node(s) refuse" in found["all nodes"].sentence


def _odds_cross(removal: dict[tuple[str, str], float], n: int = 16, own_drop: float = 6.0, noise: float = 0.0
                ) -> pd.DataFrame:
    """Per-prompt log-odds: each node refuses at 4 +- 0.3; ablating source s lowers target t's log-odds by
    removal[(s, t)] x own_drop (own ablations: removal 1), plus seeded per-prompt noise of sd `noise`."""
    spread = np.linspace(-0.3, 0.3, n)
    rng = np.random.default_rng(0)
    nodes = sorted({x for pair in removal for x in pair})
    rows = [{"source": "none", "target": t, "rate": 1.0, "n": n, "odds": 4.0 + spread} for t in nodes]
    for s_ in nodes:
        for t in nodes:
            f = 1.0 if s_ == t else removal.get((s_, t), 0.0)
            rows.append({"source": s_, "target": t, "rate": 1.0 if f < 0.5 else 0.0, "n": n,
                         "odds": 4.0 + spread - f * own_drop + 0.2 * spread[::-1] + rng.normal(0, noise, n)})
    return pd.DataFrame(rows)


def test_log_odds_one_direction_removing_both_refusals_is_one_shared_mechanism():
    # b's direction is mostly b's topic (removes little of a's refusal), a's removes b's fully: one mechanism
    (f,) = _by(decide(Figures(cross=_odds_cross({("a", "b"): 1.0, ("b", "a"): 0.1}))), "shared-vs-separable").values()
    assert f.verdict == SHARED and "log-odds" in f.sentence and f.ci is not None and f.ci[0] >= 0.5


def test_log_odds_neither_direction_removing_the_other_is_separable():
    cos = pd.DataFrame([{"a": "a", "b": "b", "cos": 0.2, "ci_low": 0.1, "ci_high": 0.3, "floor": 0.8}])
    fig = Figures(cross=_odds_cross({("a", "b"): 0.15, ("b", "a"): 0.05}), cosines=cos)
    (f,) = _by(decide(fig), "shared-vs-separable").values()
    assert f.verdict == SEPARABLE and f.ci is not None and f.ci[1] <= 0.5


def test_log_odds_half_way_removal_is_inconclusive():
    # half of the other's refusal, measured on 16 noisy prompts: neither side of 0.5 is certain
    (f,) = _by(decide(Figures(cross=_odds_cross({("a", "b"): 0.45, ("b", "a"): 0.45}, noise=3.0))),
               "shared-vs-separable").values()
    assert f.verdict == INCONCLUSIVE and f.ci is not None and f.ci[0] < 0.5 < f.ci[1]


def test_log_odds_own_ablation_below_one_nat_cannot_decide():
    (f,) = _by(decide(Figures(cross=_odds_cross({("a", "b"): 0.0, ("b", "a"): 0.0}, own_drop=0.5))),
               "shared-vs-separable").values()
    assert f.verdict == INCONCLUSIVE and "own direction" in f.sentence


# ------------------------------------------------------------------------------------------ no refusal at all


@pytest.mark.parametrize("fig", [
    Figures(cross=_cross({"a": 0.0, "b": 0.0}, {("a", "a"): 0.0, ("b", "b"): 0.0})),
    Figures(skipped="no refusal tokens: the model never refused"),
    # a base model's few refusals (2 of 16 per node): above the pooled bound, yet no node has refusal to analyse
    Figures(cross=_cross({"a": 0.125, "b": 0.125, "c": 0.0625, "d": 0.125}, {}, n=16)),
])
def test_a_model_without_refusal_gets_no_findings_only_no_refusal(fig):
    findings = decide(fig, trusted_rules=["no-refusal"])
    assert [f.question for f in findings] == list(QUESTIONS)
    assert all(f.verdict == NO_REFUSAL and f.rule == "no-refusal" and f.trusted for f in findings)
    assert verdict_metrics(findings)["by_verdict"] == {NO_REFUSAL: len(QUESTIONS)}


# ------------------------------------------------------------------------------------------ (b)


def test_one_clearly_refusing_node_is_refusal_to_analyse_even_when_the_rest_refuse_little():
    findings = decide(Figures(cross=_cross({"a": 1.0, "b": 0.125, "c": 0.125, "d": 0.0}, {}, n=16)))
    assert not any(f.verdict == NO_REFUSAL and f.subject == "model" for f in findings)
    assert _by(findings, "shared-vs-separable")["b"].verdict == NO_REFUSAL


def test_a_node_neither_clearly_refusing_nor_clearly_not_keeps_the_questions_open():
    findings = decide(Figures(cross=_cross({"a": 0.33, "b": 0.0}, {}, n=6)))
    assert not any(f.rule == "no-refusal" for f in findings)
    assert _by(findings, "shared-vs-separable")["a"].verdict == INCONCLUSIVE


def _layers(acting: range, windows: int = 10, width: int = 3, n: int = 16, drop: float = 3.0,
            added: range = range(0)) -> pd.DataFrame:
    """A restoration scan whose windows with blocks in `acting` lower the refusal log-odds by `drop` (4 -> 4 - drop,
    with per-prompt spread), plus per-layer additions."""
    spread = np.linspace(-0.3, 0.3, n)
    base = 4.0 + spread
    rows = [{"node": "a", "layer": w * width, "layer_hi": w * width + width - 1, "kind": "restore",
             "rate": 0.1 if w * width in acting else 1.0, "baseline": 1.0, "n": n,
             "odds": base - (drop if w * width in acting else 0.0) + 0.1 * spread[::-1], "odds_base": base}
            for w in range(windows)]
    rows += [{"node": "a", "layer": la, "layer_hi": la, "kind": "add", "rate": 0.9 if la in added else 0.0,
              "baseline": 0.0, "n": n} for la in (9, 18, 23)]
    return pd.DataFrame(rows)


def test_planted_layer_band_is_reported_beside_decodability_and_addition():
    dec = pd.DataFrame([{"node": "a", "layer": la, "auroc": 0.95 if la >= 6 else 0.6, "n": 30} for la in range(30)])
    # addition works at every late layer (where the direction is read); the fine-tuned weights are in blocks 9-14
    fig = Figures(cross=_cross({"a": 1.0}, {}), layers=_layers(range(9, 15), added=range(18, 30)), decodable=dec)
    f = _by(decide(fig), "where-it-acts")["a"]
    assert f.verdict == "acts in blocks 9-14" and acting_bands(f.verdict) == [(9, 14)]
    assert f.rule == "restoration-band"
    assert "decodable from layer 6" in f.sentence and "adding it raises refusal at layers 18, 23" in f.sentence
    assert f.ci is not None and f.ci[0] > 2.5


def test_two_separate_runs_of_acting_windows_are_both_reported():
    f = _by(decide(Figures(cross=_cross({"a": 1.0}, {}), layers=_layers(range(3, 6)).pipe(
        lambda d: d.assign(odds=[r.odds - 3.0 if (r.kind == "restore" and r.layer == 21) else r.odds
                                 for r in d.itertuples()])))), "where-it-acts")["a"]
    assert f.verdict == "acts in blocks 3-5, 21-23" and acting_bands(f.verdict) == [(3, 5), (21, 23)]


def test_a_window_far_below_the_largest_drop_does_not_act():
    scan = _layers(range(12, 15), drop=4.0)
    # blocks 24-26 lower the log-odds by 0.8 (above WINDOW_MIN_DROP) but under a quarter of the 4.0 of 12-14
    scan["odds"] = [r.odds - 0.8 if (r.kind == "restore" and r.layer == 24) else r.odds for r in scan.itertuples()]
    f = _by(decide(Figures(cross=_cross({"a": 1.0}, {}), layers=scan)), "where-it-acts")["a"]
    assert f.verdict == "acts in blocks 12-14"


def test_no_acting_window_is_inconclusive():
    f = _by(decide(Figures(cross=_cross({"a": 1.0}, {}), layers=_layers(range(0)))), "where-it-acts")["a"]
    assert f.verdict == INCONCLUSIVE and acting_bands(f.verdict) == [] and "spread wider" in f.sentence


def test_small_drops_in_every_window_are_inconclusive():
    f = _by(decide(Figures(cross=_cross({"a": 1.0}, {}), layers=_layers(range(0, 30), drop=0.2))),
            "where-it-acts")["a"]
    assert f.verdict == INCONCLUSIVE


def test_without_a_reference_model_nothing_is_localised():
    adds = _layers(range(0), added=range(9, 30))
    f = _by(decide(Figures(cross=_cross({"a": 1.0}, {}), layers=adds[adds["kind"] == "add"])), "where-it-acts")["a"]
    assert f.verdict == INCONCLUSIVE and "no restoration scan" in f.sentence and "--reference" in f.sentence


# ------------------------------------------------------------------------------------------ (c)


def _wording(det: int | None, word: int | None) -> pd.DataFrame:
    return pd.DataFrame([{"node": "(all)", "layer": la, "probe_accuracy": 0.95 if det is not None and la >= det
                          else 0.3, "probe_chance": 0.25, "wording_z": 3.0 if word is not None and la >= word else 0.1}
                         for la in range(12)])


@pytest.mark.parametrize(("det", "word", "verdict"), [(2, 8, "detection precedes wording"),
                                                      (5, 5, "detection and wording at the same depth"),
                                                      (2, None, INCONCLUSIVE), (8, 2, INCONCLUSIVE)])
def test_detection_vs_wording(det, word, verdict):
    fig = Figures(cross=_cross({"a": 1.0}, {}), wording=_wording(det, word))
    (f,) = _by(decide(fig), "detection-vs-wording").values()
    assert f.verdict == verdict


# ------------------------------------------------------------------------------------------ (d), (e)


def _conditions(control: bool) -> pd.DataFrame:
    rows = [{"node": "a", "condition": "(none)", "n": 100, "rate": 0.95},
            {"node": "a", "condition": "purpose=licensed_research", "n": 100, "rate": 0.1},
            {"node": "a", "condition": "user_age=minor", "n": 100, "rate": 0.85},
            {"node": "b", "condition": "user_age=minor", "n": 100, "rate": 0.85},
            {"node": "a", "condition": "user_vulnerability=at_risk", "n": 4, "rate": 0.5},
            {"node": "c", "condition": "purpose=education", "n": 100, "rate": 0.2}]
    if control:
        rows += [{"node": "a", "condition": "control=neutral", "n": 100, "rate": 0.85},
                 {"node": "b", "condition": "control=neutral", "n": 100, "rate": 0.85},
                 {"node": "c", "condition": "control=neutral", "n": 100, "rate": 0.2},
                 # a node met by no condition: its control must not enter any comparison
                 {"node": "d", "condition": "control=neutral", "n": 400, "rate": 0.0}]
    return pd.DataFrame(rows)


def test_condition_effects_are_read_against_the_control_framing():
    found = _by(decide(Figures(cross=_cross({"a": 1.0}, {}), conditions=_conditions(True))), "condition-effects")
    assert found["purpose=licensed_research"].verdict == "loosens refusal"
    # unframed refusal is 0.95, but the control framing (same length, states nothing) is 0.85: a minor's framing
    # at 0.85 changes nothing beyond the added text
    assert found["user_age=minor"].verdict == "no effect beyond the added text"
    assert found["user_age=minor"].n == 200
    assert found["user_vulnerability=at_risk"].verdict == INCONCLUSIVE
    # node c refuses little under any framing: compared with c's own control, education changes nothing; against
    # the pooled control of every node (0.85 on a and b) it would have read as "loosens refusal"
    assert found["purpose=education"].verdict == "no effect beyond the added text"
    assert "(none)" not in found and "control=neutral" not in found


def test_without_a_control_framing_every_condition_is_inconclusive():
    found = _by(decide(Figures(cross=_cross({"a": 1.0}, {}), conditions=_conditions(False))), "condition-effects")
    assert found and all(f.verdict == INCONCLUSIVE and "control framing" in f.sentence for f in found.values())


def test_harmfulness_vs_refusal_waits_for_the_2x2_analysis():
    (f,) = _by(decide(Figures(cross=_cross({"a": 1.0}, {}))), "harm-vs-refusal").values()
    assert f.verdict == INCONCLUSIVE and "2×2 analysis not available" in f.sentence


# ------------------------------------------------------------------------------------------ files


def test_findings_json_from_an_atlas_folder_has_the_contract_shape(tmp_path):
    out = build_atlas(tmp_path / "atlas")
    fig = read_figures(out)
    assert len(fig.cross) and len(fig.cosines) and len(fig.layers) and len(fig.decodable) and len(fig.wording)
    block = write_findings(out, trusted_rules=["component-removal"])

    def no_nan(token: str) -> float:
        raise AssertionError(f"findings.json carries {token}")

    data = json.loads((out / "findings.json").read_text(), parse_constant=no_nan)
    assert set(data) == {"findings"} and data["findings"]
    keys = {"question", "title", "subject", "verdict", "sentence", "rule", "rule_text", "value", "ci", "n", "trusted",
            "evidence"}
    for f in data["findings"]:
        assert set(f) == keys and f["question"] in QUESTIONS and f["evidence"].startswith("#")
        assert f["ci"] is None or (len(f["ci"]) == 2 and f["ci"][0] <= f["ci"][1])
        assert f["trusted"] == (f["rule"] == "component-removal")
    assert block["n_findings"] == len(data["findings"]) and set(block["questions"]) == set(QUESTIONS)


def test_a_table_missing_a_read_column_is_a_one_line_error(tmp_path):
    from refusal_atlas.errors import AtlasError

    out = build_atlas(tmp_path / "atlas")
    cross = pd.read_parquet(out / "causal" / "cross_ablation.parquet").drop(columns=["first_token_refusal_rate"])
    cross.to_parquet(out / "causal" / "cross_ablation.parquet")
    with pytest.raises(AtlasError, match=r"cross_ablation\.parquet: lacks column"):
        read_figures(out)
