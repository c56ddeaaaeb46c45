"""Scoring (the corrected reading): hand-computed cases, every task of a benchmark, intervals and agreement."""

from __future__ import annotations

import pytest

from evaluation.microworldbench import DIMENSIONS, Criterion, Task
from evaluation.scoring import agreement, dimension_raw, dimension_score, mean_ci, score_task, summarize

P = lambda w: Criterion("positive", 1, w)  # noqa: E731
N = lambda w: Criterion("penalty", -1, w)  # noqa: E731


def _task(index=1, level="Organ-level"):
    return Task(
        index=index,
        task="t",
        requirement="r",
        level=level,
        rubrics={
            "scientific": (P(1.0), P(0.5), P(0.2), N(1.0), N(0.5)),
            "visual": (P(1.0), P(1.0), N(0.5)),
            "instruction": (P(0.5), P(0.0), N(1.0)),
        },
    )


def test_dimension_hand_computed():
    crit = _task().rubrics["scientific"]
    assert dimension_raw(crit, [1, 1, 0, 0, 0]) == (1.5, 1.7)
    assert dimension_score(crit, [1, 1, 0, 0, 0]) == pytest.approx(1.5 / 1.7 * 100)
    # a present problem (penalty x=1) subtracts its weight
    assert dimension_score(crit, [1, 1, 1, 0, 1]) == pytest.approx((1.7 - 0.5) / 1.7 * 100)
    # clamp at zero
    assert dimension_raw(crit, [0, 0, 1, 1, 1]) == pytest.approx((-1.3, 1.7))
    assert dimension_score(crit, [0, 0, 1, 1, 1]) == 0.0
    assert dimension_score(crit, [1, 1, 1, 0, 0]) == pytest.approx(100.0)


def test_short_or_non_binary_answers_are_rejected_not_inflated():
    crit = _task().rubrics["scientific"]
    with pytest.raises(ValueError, match="4 judgements for 5"):
        dimension_raw(crit, [1, 1, 0, 0])
    with pytest.raises(ValueError, match="0 or 1"):
        dimension_raw(crit, [1, 2, 0, 0, 0])


def test_pooled_task_score_hand_computed():
    task = _task()
    score = score_task(task, {"scientific": [1, 0, 0, 1, 0], "visual": [1, 1, 1], "instruction": [0, 1, 1]})
    # R: sci 1.0 - 1.0 = 0.0, vis 2.0 - 0.5 = 1.5, ins 0 - 1.0 = -1.0; M: 1.7, 2.0, 0.5
    assert score.dimensions == pytest.approx({"scientific": 0.0, "visual": 75.0, "instruction": 0.0})
    assert score.score == pytest.approx(0.5 / 4.2 * 100)  # pooled, not the mean of dimension scores
    # a negative dimension pulls the pooled score down although its own score clamps at 0
    assert score.score < sum(score.dimensions.values()) / 3


def test_missing_dimension_marks_task_partial_and_is_excluded():
    full = score_task(_task(1), {"scientific": [1, 1, 1, 0, 0], "visual": [1, 1, 0], "instruction": [1, 0, 0]})
    partial = score_task(_task(2, "Cellular-level"), {"scientific": [0, 0, 0, 1, 1], "visual": None})
    assert partial.missing == ("visual", "instruction") and partial.score is None and not partial.valid
    summary = summarize([full, partial])
    assert summary.n_selected == 2 and summary.n_valid == 1
    assert summary.partial == {2: ("visual", "instruction")}
    assert summary.overall.mean == pytest.approx(100.0) and summary.overall.n == 1
    assert summary.by_level["Cellular-level"].mean is None  # not a zero
    assert summary.by_dimension["scientific"].mean == pytest.approx(100.0)


def test_regression_every_task_with_random_judgements(bench, bench_dir, random_judgement_regression):
    summary = random_judgement_regression(bench, bench_dir)
    assert summary.n_valid == 16 and not summary.partial
    assert summary.overall.n == 16
    assert sum(summary.by_level[lv].n for lv in summary.by_level) == 16
    # pinned values of this seeded run on the synthetic set (regression guard)
    assert summary.overall.mean == pytest.approx(37.8490, abs=1e-3)
    assert summary.by_dimension["visual"].mean == pytest.approx(39.9061, abs=1e-3)
    assert summary.overall.ci_low < summary.overall.mean < summary.overall.ci_high
    # a perfect video (every positive met, no penalty) scores 100 everywhere
    perfect = [
        score_task(t, {d: [int(c.sign > 0) for c in t.rubrics[d]] for d in DIMENSIONS}) for t in bench.tasks.values()
    ]
    assert {s.score for s in perfect} == {100.0}


def test_mean_ci():
    stat = mean_ci([0.0, 50.0, 100.0, 50.0], n_resamples=500)
    assert stat.mean == 50.0 and 0.0 <= stat.ci_low < 50.0 < stat.ci_high <= 100.0 and stat.n == 4
    assert mean_ci([]).mean is None
    single = mean_ci([42.0])
    assert (single.mean, single.ci_low, single.n) == (42.0, None, 1)


def test_agreement_hand_computed():
    # two repeats over two tasks of 5 criteria = 10 items, 8 agree
    a = [[1, 1, 0, 0, 1], [1, 0, 1, 0, 1]]
    b = [[1, 1, 0, 1, 1], [1, 0, 1, 0, 0]]
    result = agreement([a, b])
    # po = 0.8; pa(1) = pb(1) = 0.6 -> pe = 0.36 + 0.16 = 0.52; kappa = 0.28 / 0.48
    assert result.percent_agreement == pytest.approx(80.0)
    assert result.kappa == pytest.approx(0.28 / 0.48)
    assert (result.n_items, result.repeats) == (10, 2)
    same = agreement([a, a, a])
    assert same.kappa == pytest.approx(1.0) and same.percent_agreement == 100.0
    with pytest.raises(ValueError):
        agreement([a])
