"""Iso-accuracy interpolation and the bootstrap, on synthetic curves with known answers."""
import itertools
import math

import numpy as np
import pytest

from jest_curate import report
from jest_curate import study_stats as st

BUDGETS = [1000, 2000, 4000, 8000]


def _log_curve(a, k, xs=BUDGETS):
    """accuracy = a + k log2(x / 1000): linear in log-examples, so interpolation is exact."""
    return [a + k * math.log2(x / 1000) for x in xs]


def test_crossing_on_a_log_linear_curve_is_exact():
    acc = _log_curve(0.30, 0.05)  # 0.30, 0.35, 0.40, 0.45
    c = st.iso_accuracy_crossing(acc, 0.375)  # Halfway in log between 2000 and 4000.
    assert c.status == st.REACHED and c.index == 2 and c.t == pytest.approx(0.5)
    assert st.interpolate_at(BUDGETS, c) == pytest.approx(2000 * math.sqrt(2))
    flops = [10.0, 30.0, 90.0, 270.0]
    assert st.interpolate_at(flops, c) == pytest.approx(30 * math.sqrt(3))


def test_crossing_needs_the_curve_to_stay_above_the_target():
    # Above at 2000, dips below at 4000, above again at 8000: reached between 4000 and 8000.
    c = st.iso_accuracy_crossing([0.30, 0.42, 0.38, 0.44], 0.40)
    assert (c.status, c.index) == (st.REACHED, 3)
    assert c.t == pytest.approx(1 / 3)
    assert st.interpolate_at(BUDGETS, c) == pytest.approx(4000 * 2 ** (1 / 3))


def test_not_reached_and_reached_at_the_smallest_budget():
    assert st.iso_accuracy_crossing([0.3, 0.35, 0.36], 0.4).status == st.NOT_REACHED
    assert st.interpolate_at(BUDGETS[:3], st.iso_accuracy_crossing([0.3, 0.35, 0.36], 0.4)) \
        is None
    c = st.iso_accuracy_crossing([0.5, 0.6, 0.7], 0.4)
    assert c.status == st.AT_MOST and st.interpolate_at(BUDGETS[:3], c) == 1000
    # The target exactly at the largest budget: uniform's own crossing is its largest budget.
    c = st.iso_accuracy_crossing([0.3, 0.35, 0.4], 0.4)
    assert st.interpolate_at(BUDGETS[:3], c) == pytest.approx(4000)


def test_bootstrap_of_a_mean_matches_the_exact_bootstrap_distribution():
    values = np.array([0.0, 1.0, 2.0])
    # Exactly: 27 equally likely resamples; P(mean = 0) = P(mean = 2) = 1/27 > 2.5%.
    exact = sorted(np.mean(values[list(idx)]) for idx in itertools.product(range(3), repeat=3))
    lo, hi = np.quantile(exact, [0.025, 0.975], method="inverted_cdf")
    ci = st.bootstrap_interval(lambda idx: float(values[idx].mean()), 3, num_resamples=20000)
    assert ci == (lo, hi) == (0.0, 2.0)
    values = np.arange(10.0)
    ci = st.bootstrap_interval(lambda idx: float(values[idx].mean()), 10, num_resamples=20000)
    se = values.std() / math.sqrt(10)  # Normal approximation of the bootstrap of a mean.
    assert ci[0] == pytest.approx(4.5 - 1.96 * se, abs=0.2)
    assert ci[1] == pytest.approx(4.5 + 1.96 * se, abs=0.2)
    assert st.bootstrap_interval(lambda idx: 0.0, 1) is None


def test_paired_differences_and_significance():
    same = st.paired_difference([0.5, 0.6, 0.7, 0.8, 0.9], [0.45, 0.55, 0.65, 0.75, 0.85])
    assert same["mean"] == pytest.approx(0.05)
    assert same["ci"] == pytest.approx([0.05, 0.05]) and same["significant"] is True
    noisy = st.paired_difference([1.0, -1.0, 1.0, -1.0, 0.0], [0.0] * 5)
    assert noisy["ci"][0] < 0 < noisy["ci"][1] and noisy["significant"] is False
    assert st.paired_difference([0.5], [0.4])["significant"] is None  # One seed: no interval.
    assert st.excludes([1.1, 2.0], 1.0) and not st.excludes([0.9, 2.0], 1.0)


def _metrics(curves, flops_per_example, reference_training=0):
    """{method: {budget: [final_metrics per seed]}} from per-seed accuracy curves."""
    out = {}
    for m, per_seed in curves.items():
        out[m] = {}
        for i, b in enumerate(BUDGETS[:len(per_seed[0])]):
            examples = b
            train = flops_per_example[m] * examples
            out[m][b] = [{"flops_per_example": {"training": 3.0}, "accuracy": acc[i], "balanced": acc[i], "retrieval_r1": 0.1,
                          "per_class": None, "examples": examples,
                          "ledger": {"reference_training": reference_training,
                                     "reference_scoring": 0, "learner_scoring": 0,
                                     "selection": 0, "training": train,
                                     "all_in": train + reference_training,
                                     "amortised": train}} for acc in per_seed]
    return out


def test_study_speedups_on_synthetic_curves_with_known_answers():
    uniform = _log_curve(0.30, 0.05)  # Target: 0.45 at 8000.
    jest = _log_curve(0.375, 0.05)  # 0.45 exactly halfway (in log) between 2000 and 4000.
    never = _log_curve(0.20, 0.01)
    seeds = 5
    metrics = _metrics({"uniform": [uniform] * seeds, "jest": [jest] * seeds,
                        "hard-learner": [never] * seeds},
                       {"uniform": 1.0, "jest": 3.0, "hard-learner": 1.0},
                       reference_training=1000)
    summary = report.study_summary(metrics, num_resamples=200)
    assert summary["target_accuracy"] == pytest.approx(0.45)
    row = summary["methods"]["jest"]
    needed = 2000 * math.sqrt(2)
    assert row["examples_speedup"] == pytest.approx(8000 / needed)
    # FLOPs: 3 per example; all-in adds the reference's 1000 to both sides.
    assert row["flops_amortised_speedup"] == pytest.approx(8000 / (3 * needed))
    flops = math.exp((math.log(6000 + 1000) + math.log(12000 + 1000)) / 2)
    assert row["flops_all_in_speedup"] == pytest.approx((8000 + 1000) / flops)
    # Identical seeds: the intervals collapse onto the point estimate.
    assert row["examples_speedup_ci"] == pytest.approx([8000 / needed] * 2)
    assert row["examples_speedup_significant"] is True
    assert summary["methods"]["hard-learner"]["examples_speedup"] is None
    assert summary["methods"]["hard-learner"]["examples_speedup_ci"] == [None, None]
    assert summary["methods"]["hard-learner"]["examples_speedup_significant"] is None
    assert summary["methods"]["uniform"]["examples_speedup"] == pytest.approx(1.0)
    diff = row["difference_to_uniform"][-1]
    assert diff["budget"] == 8000 and diff["mean"] == pytest.approx(0.075)
    assert diff["significant"] is True


def test_seed_noise_makes_a_speedup_not_significant():
    rng = np.random.default_rng(0)
    uniform = [[a + rng.normal(0, 0.03) for a in _log_curve(0.30, 0.05)] for _ in range(5)]
    jest = [[a + rng.normal(0, 0.03) for a in _log_curve(0.305, 0.05)] for _ in range(5)]
    summary = report.study_summary(_metrics({"uniform": uniform, "jest": jest},
                                            {"uniform": 1.0, "jest": 1.0}), num_resamples=500)
    row = summary["methods"]["jest"]
    lo, hi = row["examples_speedup_ci"]
    assert (lo is None or lo <= 1.0) and 1.0 <= hi
    assert row["examples_speedup_significant"] is False
    assert row["difference_to_uniform"][-1]["significant"] is False
    assert "not significant" in report.render_table({**summary, "settings": {}})


def test_a_speedup_not_reached_in_some_resamples_has_a_not_reached_lower_end():
    """Two of five seeds end below uniform's target: resamples drawing mostly those do
    not reach it, so the interval's lower end is "not reached", not a number."""
    uniform = _log_curve(0.30, 0.05)  # Target 0.45.
    ends = (0.50, 0.50, 0.50, 0.40, 0.40)  # Seed mean 0.46: reached, but not surely.
    jest = [[0.2, 0.3, 0.35, end] for end in ends]
    summary = report.study_summary(_metrics({"uniform": [uniform] * 5, "jest": jest},
                                            {"uniform": 1.0, "jest": 1.0}), num_resamples=500)
    row = summary["methods"]["jest"]
    assert row["examples_speedup"] is not None
    lo, hi = row["examples_speedup_ci"]
    assert lo is None and 1.0 <= hi <= 8000 / 4000 * 2
    assert row["examples_speedup_significant"] is False
    assert st.excludes([None, 0.8], 1.0) is True  # Not reached lies below 0.8.
    assert st.excludes([None, None], 1.0) is None
    table = report.render_table({**summary, "settings": {}})
    assert f"[not reached, {hi:.2f}] (not significant)" in table


def test_findings_read_the_summary_they_are_rendered_from():
    uniform, jest = _log_curve(0.30, 0.05), _log_curve(0.375, 0.05)
    clip = _log_curve(0.32, 0.05)
    seeds = 5
    metrics = _metrics({"uniform": [uniform] * seeds, "jest": [jest] * seeds,
                        "clip-score-20": [clip] * seeds},
                       {"uniform": 1.0, "jest": 3.0, "clip-score-20": 1.0},
                       reference_training=1000)
    summary = report.study_summary(metrics, num_resamples=200)
    summary["reference_zero_shot"] = 0.5
    text = report.render_findings(summary, num_resamples=200).replace("\n  ", " ")
    assert "**jest vs uniform** at 8000 steps: +0.075 zero-shot [+0.075, +0.075] " \
           "(significant)" in text
    assert f"a speedup of {8000 / (2000 * math.sqrt(2)):.2f}x" in text
    assert "**jest vs clip-score-20** at 8000 steps: +0.055 zero-shot" in text
    assert "uniform's target (0.450) is 0.90 of it" in text
    assert "Where jest's FLOPs go" in text


def test_lever_findings_compare_each_variant_with_the_headline_setting():
    seeds = 3
    jest = _log_curve(0.375, 0.05, BUDGETS[:2])
    # Online is 0.02 ahead of jest on every seed; n4 differs by seed around zero.
    online = [a + 0.02 for a in jest]
    n4 = [[a + d for a in jest] for d in (-0.01, 0.0, 0.01)]
    metrics = _metrics({"uniform": [_log_curve(0.3, 0.05, BUDGETS[:2])] * seeds,
                        "jest": [jest] * seeds, "jest-online": [online] * seeds,
                        "jest-n4": n4},
                       {"uniform": 1.0, "jest": 3.0, "jest-online": 6.0, "jest-n4": 3.0})
    summary = report.study_summary(metrics, num_resamples=200)
    summary["settings"] = {"run": {"chunks": 16, "selection_mode": "rounds"},
                           "variants": {"jest-online": {"method": "jest",
                                                        "selection_mode": "online"},
                                        "jest-n4": {"method": "jest", "chunks": 4},
                                        "jest-k4": {"method": "jest", "rescore_every": 4}}}
    # A field the study's run leaves at its default shows the default it changes.
    assert report._variant_change(summary, "jest-k4", "jest") == "rescore_every 1 → 4"
    text = report.render_lever_findings(summary, num_resamples=200)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["jest-online"] == ("| jest-online | selection_mode rounds → online | "
                                   "+0.020 [+0.020, +0.020] * | +0.020 [+0.020, +0.020] * | 2.00 |")
    assert rows["jest-n4"].startswith("| jest-n4 | chunks 16 → 4 | +0.000 [")
    assert " * " not in rows["jest-n4"]  # Seeds disagree: the interval holds zero.
    assert "uniform" not in rows and "0.375 (itself)" in rows["jest"]
