"""MicroWorldBench scoring in two named readings, with confidence intervals and judge agreement.

For one task and one dimension with binary judgements x_k, signs s_k and weights w_k::

    R = sum_k x_k * s_k * w_k,   M = sum of w_k over positive criteria (s_k = +1)
    dimension score = max(0, R / M) * 100          (0 when M <= 0)
    task score      = max(0, (R_sci + R_vis + R_ins) / (M_sci + M_vis + M_ins)) * 100

Overall and per-level averages are plain means (``sum / len``) of task scores; per-dimension
averages are means of dimension scores.

Two readings of the formula (:data:`SCORINGS`):

* ``corrected`` (default, :func:`score_task`): one 0/1 judgement per criterion, criteria in
  order (``d11..d55`` blocks read as ``d1..d5``), and ``M`` sums *all* positive criteria of the
  block, so a short answer cannot inflate a score: a judgement whose length differs from the
  number of criteria is rejected.
* ``published`` (:func:`score_task_published`): the upstream scorer (``eval/calculate_scores.py``)
  bit for bit: answer ``k`` is matched to the criterion *numbered* ``k`` (so ``d11..d55`` blocks
  are read as empty unless an answer has 11+ scores), a score counts when it equals 1, and ``M``
  sums only the positive criteria that were answered.

Missing dimensions (no valid answer) never score zero: the task is marked *partial*, has no
task score, and is left out of every average (as the published scorer skips it), so all
averages are over the same valid tasks. Coverage (valid / selected) and the partial tasks are
reported.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .microworldbench import DIMENSIONS, LEVELS, Criterion, Task

logger = logging.getLogger(__name__)

SCORINGS: tuple[str, ...] = ("corrected", "published")
"""The scoring readings, the default first (see the module doc)."""


def dimension_raw(criteria: Sequence[Criterion], judgements: Sequence[int]) -> tuple[float, float]:
    """Return ``(R, M)`` for one dimension; judgements must be 0/1, one per criterion."""
    if len(judgements) != len(criteria):
        raise ValueError(f"{len(judgements)} judgements for {len(criteria)} criteria")
    if any(x not in (0, 1) for x in judgements):
        raise ValueError(f"judgements must be 0 or 1, got {list(judgements)}")
    raw = sum(x * c.sign * c.weight for x, c in zip(judgements, criteria, strict=True))
    max_possible = sum(c.weight for c in criteria if c.sign > 0)
    return float(raw), float(max_possible)


def normalise(raw: float, max_possible: float) -> float:
    """``max(0, raw / max_possible) * 100``, or 0.0 when ``max_possible <= 0``.

    The zero case only arises in the published reading (a block read as empty, or answers that
    cover no positive criterion); loading rejects blocks without a positive weight, so it never
    arises in the corrected reading.
    """
    if max_possible <= 0:
        return 0.0
    return max(0.0, raw / max_possible) * 100.0


def dimension_score(criteria: Sequence[Criterion], judgements: Sequence[int]) -> float:
    """Score one dimension of one task (0..100)."""
    return normalise(*dimension_raw(criteria, judgements))


@dataclass(frozen=True)
class TaskScore:
    """The scores of one task."""

    index: int
    """Task index."""
    level: str | None
    """Task level."""
    dimensions: Mapping[str, float]
    """Score per judged dimension (0..100)."""
    raw: Mapping[str, tuple[float, float]]
    """``(R, M)`` per judged dimension."""
    missing: tuple[str, ...]
    """Dimensions without a valid judgement."""

    @property
    def valid(self) -> bool:
        """True when every dimension was judged."""
        return not self.missing

    @property
    def score(self) -> float | None:
        """Pooled task score, or None for a partial task."""
        if not self.valid:
            return None
        return normalise(sum(r for r, _ in self.raw.values()), sum(m for _, m in self.raw.values()))


def score_task(task: Task, judgements: Mapping[str, Sequence[int] | None]) -> TaskScore:
    """Score a task from its judgements per dimension (None or absent = missing)."""
    raw = {
        dim: dimension_raw(task.rubrics[dim], values)
        for dim in DIMENSIONS
        if (values := judgements.get(dim)) is not None
    }
    return _task_score(task, raw)


def _task_score(task: Task, raw: dict[str, tuple[float, float]]) -> TaskScore:
    """The :class:`TaskScore` of ``task`` from ``(R, M)`` per judged dimension (the others missing)."""
    return TaskScore(
        index=task.index,
        level=task.level,
        dimensions={d: normalise(*rm) for d, rm in raw.items()},
        raw=raw,
        missing=tuple(d for d in DIMENSIONS if d not in raw),
    )


def published_dimension_raw(criteria: Sequence[Criterion], scores: Iterable[Any]) -> tuple[float, float]:
    """``(R, M)`` of one dimension in the published reading (the upstream scorer's arithmetic).

    Answer ``k`` (1-based) goes to the criterion numbered ``k`` (:attr:`Criterion.number`, or its
    position when unnumbered); answers without such a criterion are ignored. A score counts when
    it equals 1 (so ``True`` and ``1.0`` do, ``"1"`` does not); ``M`` sums the positive weights
    of the answered criteria only.
    """
    by_number = {c.number or k: c for k, c in enumerate(criteria, 1)}
    raw = max_possible = 0.0
    for k, score in enumerate(scores, 1):
        criterion = by_number.get(k)
        if criterion is None:
            continue
        if score == 1:
            raw += criterion.sign * criterion.weight
        if criterion.sign > 0:
            max_possible += criterion.weight
    return raw, max_possible


def score_task_published(task: Task, judgements: Mapping[str, Iterable[Any] | None]) -> TaskScore:
    """Score a task in the published reading; a dimension with no or empty scores is missing."""
    raw = {
        dim: published_dimension_raw(task.rubrics[dim], values)
        for dim in DIMENSIONS
        if (values := judgements.get(dim))
    }
    return _task_score(task, raw)


def task_scorer(scoring: str) -> Callable[[Task, Mapping[str, Any]], TaskScore]:
    """The task scorer of a reading: :func:`score_task` (``corrected``) or :func:`score_task_published`."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring reading {scoring!r}; choose from {SCORINGS}")
    return score_task if scoring == "corrected" else score_task_published


@dataclass(frozen=True)
class Stat:
    """A mean with its 95 % bootstrap confidence interval."""

    mean: float | None
    """Mean (``sum(values) / len(values)``, as the upstream scorer), None when there is no data."""
    ci_low: float | None
    """Lower bound of the 95 % percentile bootstrap interval (None below 2 values)."""
    ci_high: float | None
    """Upper bound."""
    n: int
    """Number of values."""


def mean_ci(values: Sequence[float], n_resamples: int = 2000, seed: int = 0) -> Stat:
    """Plain mean (``sum / len``, bit-identical to the upstream scorer) and 95 % percentile bootstrap interval."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return Stat(None, None, None, 0)
    mean = float(sum(values) / len(values))
    if data.size < 2 or np.all(data == data[0]):
        return Stat(mean, mean if data.size >= 2 else None, mean if data.size >= 2 else None, int(data.size))
    from scipy.stats import bootstrap  # the eval extra: the service's /judge never needs a CI

    res = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=n_resamples, method="percentile", rng=seed)
    return Stat(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), int(data.size))


@dataclass(frozen=True)
class Summary:
    """Aggregate scores of a run (the paper's two tables plus coverage)."""

    overall: Stat
    """Mean task score over valid tasks."""
    by_level: Mapping[str, Stat]
    """Mean task score per level."""
    by_dimension: Mapping[str, Stat]
    """Mean dimension score per dimension (over valid tasks)."""
    n_selected: int
    """Tasks selected for the run."""
    n_valid: int
    """Tasks with all three dimensions judged."""
    partial: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    """Missing dimensions of each partial task."""


def summarize(
    scores: Sequence[TaskScore], n_selected: int | None = None, n_resamples: int = 2000, seed: int = 0
) -> Summary:
    """Aggregate task scores; partial tasks are excluded from every mean and listed."""
    valid = [s for s in scores if s.valid]
    return Summary(
        overall=mean_ci([s.score for s in valid], n_resamples, seed),
        by_level={lv: mean_ci([s.score for s in valid if s.level == lv], n_resamples, seed) for lv in LEVELS},
        by_dimension={d: mean_ci([s.dimensions[d] for s in valid], n_resamples, seed) for d in DIMENSIONS},
        n_selected=len(scores) if n_selected is None else n_selected,
        n_valid=len(valid),
        partial={s.index: s.missing for s in scores if not s.valid},
    )


@dataclass(frozen=True)
class Agreement:
    """Judge self-agreement on one dimension over repeated judgements."""

    kappa: float | None
    """Mean pairwise Cohen's kappa between repeats (None when undefined, e.g. one class only)."""
    percent_agreement: float
    """Percentage of criteria on which every repeat gave the same judgement."""
    n_items: int
    """Criteria compared (tasks x criteria)."""
    repeats: int
    """Number of repeats."""


def agreement(repeats: Sequence[Sequence[Sequence[int]]]) -> Agreement:
    """Agreement from ``repeats[r][t]`` = judgements of repeat ``r`` on task ``t``.

    Every repeat must cover the same tasks with the same number of judgements each.
    """
    if len(repeats) < 2:
        raise ValueError("agreement needs at least 2 repeats")
    flat = [
        np.concatenate([np.asarray(t, dtype=int) for t in rep]) if len(rep) else np.zeros(0, int) for rep in repeats
    ]
    if len({f.size for f in flat}) != 1:
        raise ValueError("repeats must judge the same items")
    from sklearn.metrics import cohen_kappa_score  # the eval extra

    matrix = np.vstack(flat)
    kappas = []
    for a, b in itertools.combinations(range(len(flat)), 2):
        if len(set(matrix[a]) | set(matrix[b])) < 2:
            continue  # kappa undefined when both raters use a single class
        kappas.append(cohen_kappa_score(matrix[a], matrix[b]))
    all_same = np.all(matrix == matrix[0], axis=0) if matrix.size else np.zeros(0, bool)
    return Agreement(
        kappa=float(np.mean(kappas)) if kappas else None,
        percent_agreement=float(all_same.mean() * 100) if all_same.size else 0.0,
        n_items=int(matrix.shape[1]),
        repeats=len(flat),
    )
