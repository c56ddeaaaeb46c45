"""MicroWorldBench loading, validation, normalisation and task selection.

The published files (upstream ``FreedomIntelligence/MicroVerse``, folder ``eval/``) are read
from a local folder or downloaded once from the upstream raw URL into a local cache.

Which file provides what:

* ``MWBenchRubrics_norm.json`` gives the criteria and the **weights used for scoring** (the
  upstream scorer reads this file). Its weights are a re-mapping of the raw file's weights
  (raw 2.0/1.5/3.0 -> 1.0, raw 1.0 -> 0.5 or kept as the string "1.0", raw 0.7 -> 0.2 or
  0.5, raw 0.5 -> 0.0); 884 criteria therefore weigh 0 and never move a score. They are still
  judged, as upstream does. Criterion texts and signs are identical in both files.
* ``MWBenchRubrics.json`` gives the task text under ``task``/``requirement`` (the norm file
  has the same text under ``任务``/``具体要求``); both are checked to agree.
* ``finaltasks.json`` gives each task's level (``final_label``).

Known defects are normalised and reported once, as :class:`Anomaly` records: criteria
numbered ``d11..d55`` are renumbered ``d1..d5`` (each criterion keeps its published number in
:attr:`Criterion.number`, which the published scoring reading uses); string weights are parsed; a
block with a number of criteria other than five is kept as is and reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

DIMENSIONS: tuple[str, ...] = ("scientific", "visual", "instruction")
"""The three judged dimensions, in the published order."""

DIMENSION_TITLES: dict[str, str] = {
    "scientific": "Scientific Accuracy",
    "visual": "Visual Quality",
    "instruction": "Instruction Following",
}
LEVELS: tuple[str, ...] = ("Organ-level", "Cellular-level", "Subcellular-level")
"""Task levels as labelled in ``finaltasks.json``."""

UPSTREAM_REPO = "FreedomIntelligence/MicroVerse"
UPSTREAM_COMMIT = "d4eb6079"
UPSTREAM_RAW_URL = f"https://raw.githubusercontent.com/{UPSTREAM_REPO}/{UPSTREAM_COMMIT}/eval"
RUBRICS_FILE = "MWBenchRubrics.json"
NORM_FILE = "MWBenchRubrics_norm.json"
TASKS_FILE = "finaltasks.json"
BENCHMARK_FILES: tuple[str, ...] = (RUBRICS_FILE, NORM_FILE, TASKS_FILE)

_KEY_RE = re.compile(r"^([dsw])([0-9]{1,6})$")
"""A rubric key: ``d``, ``s`` or ``w`` and an ASCII criterion number (short: ``int()`` of 5000 digits fails)."""
_SIGNS: dict[str, int] = {"+1": 1, "1": 1, "-1": -1}


class RubricError(ValueError):
    """A rubric block cannot be interpreted (missing keys, bad sign or weight, nothing to score)."""


@dataclass(frozen=True)
class Criterion:
    """One rubric criterion."""

    text: str
    """What the judge checks."""
    sign: int
    """+1 for a positive point, -1 for a penalty point (scored 1 when the problem is present)."""
    weight: float
    """Scoring weight (from ``MWBenchRubrics_norm.json`` for the benchmark)."""
    number: int = 0
    """The criterion's number ``k`` in the published block (``d<k>``; 11, 22, ... in a ``d11..d55`` block),
    used by the published scoring reading; 0 for a criterion built by hand (read as its position)."""


@dataclass(frozen=True)
class Anomaly:
    """A defect found in the published files, reported once."""

    kind: str
    """Short machine-readable kind, e.g. ``renumbered_criteria``."""
    detail: str
    """Human-readable description."""
    index: int | None = None
    """Task index concerned, if any."""
    dimension: str | None = None
    """Dimension concerned, if any."""


@dataclass(frozen=True)
class Task:
    """One benchmark task with its normalised rubrics."""

    index: int
    """Task index (1-based, as published)."""
    task: str
    """Task text (the generation prompt)."""
    requirement: str
    """Detailed requirements shown to the judge."""
    level: str | None
    """``Organ-level``, ``Cellular-level``, ``Subcellular-level`` or None when unknown."""
    rubrics: Mapping[str, tuple[Criterion, ...]]
    """Criteria per dimension (keys from :data:`DIMENSIONS`)."""

    def rubric_hash(self, dimension: str) -> str:
        """Stable hash of the task text and one dimension's criteria (part of cache keys)."""
        payload = json.dumps(
            [self.task, self.requirement, [(c.text, c.sign, c.weight) for c in self.rubrics[dimension]]],
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Benchmark:
    """The loaded benchmark."""

    tasks: dict[int, Task]
    """Tasks by index."""
    anomalies: list[Anomaly] = field(default_factory=list)
    """Every defect found while loading."""
    source: str = ""
    """Where the files came from."""

    def anomaly_counts(self) -> dict[str, int]:
        """Number of anomalies per kind."""
        return dict(Counter(a.kind for a in self.anomalies))


def _parse_weight(value: Any, where: str) -> float:
    try:
        weight = float(value)
    except OverflowError:  # an integer too large for a float
        raise RubricError(f"{where}: weight must be a finite number >= 0") from None
    except (TypeError, ValueError):
        raise RubricError(f"{where}: weight {value!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
        raise RubricError(f"{where}: weight {value!r} must be a finite number >= 0")
    return weight


def parse_block(
    block: Mapping[str, Any], *, where: str = "rubric", index: int | None = None, dimension: str | None = None
) -> tuple[tuple[Criterion, ...], list[Anomaly]]:
    """Parse one published rubric block (``d<k>``, ``s<k>``, ``w<k>``) into criteria.

    Returns the criteria in number order (each keeping its published number ``k``) and the
    anomalies found. Raises :class:`RubricError` when the block cannot be scored.
    """
    parts = _group_by_number(block, where)
    numbers = sorted(parts)
    anomalies = [Anomaly(kind, detail, index, dimension) for kind, detail in _numbering_defects(numbers, where)]
    criteria = [_parse_criterion(number, parts[number], where) for number in numbers]
    string_weights = [f"w{number}={parts[number]['w']!r}" for number in numbers if isinstance(parts[number]["w"], str)]
    if string_weights:
        anomalies.append(
            Anomaly(
                "string_weights", f"{where}: weights given as strings: {', '.join(string_weights)}", index, dimension
            )
        )
    if sum(c.weight for c in criteria if c.sign > 0) <= 0:
        raise RubricError(f"{where}: no positive criterion with a weight above 0, the block cannot be scored")
    return tuple(criteria), anomalies


def _group_by_number(block: Mapping[str, Any], where: str) -> dict[int, dict[str, Any]]:
    """``{"d1": ..., "s1": ..., "w1": ...}`` -> ``{1: {"d": ..., "s": ..., "w": ...}}``; other keys are an error."""
    if not isinstance(block, Mapping) or not block:
        raise RubricError(f"{where}: expected a non-empty object of d<k>/s<k>/w<k> keys")
    parts: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, value in block.items():
        match = _KEY_RE.match(str(key))
        if not match:
            raise RubricError(f"{where}: unexpected key {str(key)[:40]!r} (expected d<k>, s<k>, w<k>)")
        parts[int(match.group(2))][match.group(1)] = value
    return parts


def _numbering_defects(numbers: list[int], where: str) -> list[tuple[str, str]]:
    """(kind, detail) of the tolerated numbering defects: ``d11..d55`` for ``d1..d5``, a count other than five.

    Any other numbering than 1..n or its doubled digits is an error.
    """
    defects = []
    expected = list(range(1, len(numbers) + 1))
    if numbers != expected:
        doubled = [int(str(n) * 2) for n in expected]
        if numbers != doubled:
            raise RubricError(f"{where}: criteria numbered {numbers}, expected {expected}")
        defects.append(("renumbered_criteria", f"{where}: criteria numbered {numbers}, read as {expected}"))
    if len(numbers) != 5:
        defects.append(("criteria_count", f"{where}: {len(numbers)} criteria instead of 5"))
    return defects


def _parse_criterion(number: int, part: Mapping[str, Any], where: str) -> Criterion:
    """Criterion ``number`` from its ``d``, ``s`` and ``w`` values."""
    missing = [k for k in "dsw" if k not in part]
    if missing:
        raise RubricError(f"{where}: criterion {number} lacks {', '.join(k + str(number) for k in missing)}")
    text = part["d"]
    if not isinstance(text, str) or not text.strip():
        raise RubricError(f"{where}: d{number} must be a non-empty string")
    sign = _SIGNS.get(str(part["s"]).strip())
    if sign is None:
        raise RubricError(f"{where}: s{number} is {part['s']!r}, expected '+1' or '-1'")
    return Criterion(
        text=text.strip(), sign=sign, weight=_parse_weight(part["w"], f"{where}: w{number}"), number=number
    )


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "microverse" / "mwbench"


def fetch_benchmark_files(source: str | os.PathLike[str] | None = None, cache_dir: Path | None = None) -> Path:
    """Return a local folder holding the three benchmark files.

    ``source`` is a local folder, or an http(s) base URL whose files are downloaded once into
    ``cache_dir``; by default ``$MICROVERSE_BENCHMARK``, else the upstream raw URL at the
    published commit.
    """
    source = str(source or os.environ.get("MICROVERSE_BENCHMARK") or UPSTREAM_RAW_URL)
    if not source.startswith(("http://", "https://")):
        folder = Path(source)
        missing = [name for name in BENCHMARK_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"benchmark folder {folder} lacks {', '.join(missing)}")
        return folder
    base = source.rstrip("/")
    folder = (cache_dir or _cache_dir()) / hashlib.sha256(base.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    with httpx.Client(timeout=60.0, follow_redirects=True) as client:
        for name in BENCHMARK_FILES:
            target = folder / name
            if target.is_file():
                continue
            logger.info("downloading %s/%s", base, name)
            response = client.get(f"{base}/{name}")
            response.raise_for_status()
            json.loads(response.content)  # refuse to cache something that is not JSON
            tmp = target.with_suffix(".part")
            tmp.write_bytes(response.content)
            tmp.replace(target)
    return folder


def load_benchmark(source: str | os.PathLike[str] | None = None, cache_dir: Path | None = None) -> Benchmark:
    """Load, validate and normalise MicroWorldBench from a folder or URL (see module doc)."""
    folder = fetch_benchmark_files(source, cache_dir)
    raw = {item["index"]: item for item in json.loads((folder / RUBRICS_FILE).read_text(encoding="utf-8"))}
    norm = {item["index"]: item for item in json.loads((folder / NORM_FILE).read_text(encoding="utf-8"))}
    meta = {item["index"]: item for item in json.loads((folder / TASKS_FILE).read_text(encoding="utf-8"))}
    anomalies: list[Anomaly] = []
    tasks: dict[int, Task] = {}
    for index in sorted(norm):
        entry = norm[index]
        raw_entry = raw.get(index, {})
        task_text = raw_entry.get("task") or entry.get("任务", "")
        requirement = raw_entry.get("requirement") or entry.get("具体要求", "")
        if raw_entry and (
            raw_entry.get("task") != entry.get("任务") or raw_entry.get("requirement") != entry.get("具体要求")
        ):
            anomalies.append(Anomaly("task_text_mismatch", f"task {index}: text differs between rubric files", index))
        if not task_text:
            anomalies.append(Anomaly("missing_task_text", f"task {index}: no task text", index))
        level = meta.get(index, {}).get("final_label")
        if level not in LEVELS:
            anomalies.append(Anomaly("unknown_level", f"task {index}: level {level!r} is not one of {LEVELS}", index))
            level = None
        rubrics: dict[str, tuple[Criterion, ...]] = {}
        try:
            for dim in DIMENSIONS:
                block = entry.get(f"rubrics_{dim}")
                if block is None:
                    raise RubricError(f"task {index} {dim}: block missing")
                criteria, found = parse_block(block, where=f"task {index} {dim}", index=index, dimension=dim)
                rubrics[dim] = criteria
                anomalies.extend(found)
        except RubricError as exc:
            anomalies.append(Anomaly("invalid_block", f"{exc}; task excluded", index))
            continue
        tasks[index] = Task(index=index, task=task_text, requirement=requirement, level=level, rubrics=rubrics)
    for index in sorted(set(raw) - set(norm)):
        anomalies.append(Anomaly("missing_weights", f"task {index}: in {RUBRICS_FILE} but not in {NORM_FILE}", index))
    origin = str(source or os.environ.get("MICROVERSE_BENCHMARK") or UPSTREAM_RAW_URL)
    bench = Benchmark(tasks=tasks, anomalies=anomalies, source=origin)
    for kind, count in sorted(bench.anomaly_counts().items()):
        logger.info("benchmark anomaly %s: %d", kind, count)
    return bench


def select_tasks(
    bench: Benchmark,
    *,
    levels: Iterable[str] | None = None,
    indices: Iterable[int] | None = None,
    sample: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """Select tasks by level and/or index list, then a seeded stratified sample, then a limit.

    The stratified sample draws ``sample`` tasks with per-level counts proportional to the
    level sizes (largest remainder), each level sampled with ``random.Random(seed)``.
    """
    chosen = [bench.tasks[i] for i in sorted(bench.tasks)]
    if indices is not None:
        wanted = sorted(set(indices))
        unknown = [i for i in wanted if i not in bench.tasks]
        if unknown:
            raise ValueError(f"unknown task index(es): {unknown} (valid: 1..{max(bench.tasks)})")
        chosen = [bench.tasks[i] for i in wanted]
    if levels is not None:
        wanted_levels = set(levels)
        bad = wanted_levels - set(LEVELS)
        if bad:
            raise ValueError(f"unknown level(s) {sorted(bad)}; choose from {LEVELS}")
        chosen = [t for t in chosen if t.level in wanted_levels]
    if sample is not None:
        if sample <= 0:
            raise ValueError("sample must be positive")
        chosen = _stratified(chosen, min(sample, len(chosen)), seed)
    if limit is not None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        chosen = chosen[:limit]
    return chosen


def _stratified(tasks: Sequence[Task], n: int, seed: int) -> list[Task]:
    groups: dict[str | None, list[Task]] = defaultdict(list)
    for task in tasks:
        groups[task.level].append(task)
    keys = sorted(groups, key=lambda k: (k is None, k or ""))
    quotas = {k: n * len(groups[k]) / len(tasks) for k in keys}
    counts = {k: int(quotas[k]) for k in keys}
    for k in sorted(keys, key=lambda k: quotas[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    rng = random.Random(seed)
    picked = [t for k in keys for t in rng.sample(groups[k], counts[k])]
    return sorted(picked, key=lambda t: t.index)
