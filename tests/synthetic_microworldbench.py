"""A synthetic MicroWorldBench the tests write themselves, so they never need ``../shared``.

It has the published files' layout (upstream ``FreedomIntelligence/MicroVerse``, folder
``eval/``: ``MWBenchRubrics.json``, ``MWBenchRubrics_norm.json``, ``finaltasks.json``, same
keys, JSON arrays indented by two spaces) and 16 tasks at published task indices. Every known
defect of the published files appears at an index where the published files have it too, so
a test that names a task means the same case in both sets:

* criteria numbered ``d11..d55``: the instruction blocks of tasks 2 and 9, the scientific
  block of task 60, the visual block of task 319 (4 blocks);
* weights written as strings in the norm file: the scientific blocks of tasks 1, 60 and 126
  (task 126's ``w4`` is ``"1."``); every weight of the raw file is a string, as published;
* four criteria instead of five: the instruction block of task 277;
* all three levels: 6 organ-level, 7 cellular-level and 3 subcellular-level tasks.

Criterion texts and signs are the same in both rubric files; the raw file's weights are the
published pre-normalisation values (norm 1.0, 0.5, 0.2, 0.0 written "2.0", "1.0", "0.7", "0.5"),
except the string weights, written alike in both files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORGAN, CELL, SUBCELL = "Organ-level", "Cellular-level", "Subcellular-level"

TASKS: dict[int, tuple[str, str]] = {
    1: (ORGAN, "Red blood cells flow through a brain capillary until a clot stops them."),
    2: (CELL, "A white blood cell squeezes out of a venule and crawls towards bacteria."),
    3: (CELL, "A dividing cell lines up its chromosomes and splits into two daughter cells."),
    4: (ORGAN, "Alveoli in a lung inflate and deflate as air moves in and out."),
    5: (CELL, "Yeast cells bud, and each small bud grows until it separates."),
    6: (SUBCELL, "A kinesin motor walks along a microtubule carrying a vesicle."),
    7: (ORGAN, "Villi of the small intestine sway as digested food passes over them."),
    8: (CELL, "A macrophage engulfs a bacterium and closes a phagosome around it."),
    9: (SUBCELL, "Ribosomes translate a messenger RNA into a growing protein chain."),
    10: (ORGAN, "Heart muscle fibres contract in a wave that spreads across the tissue."),
    11: (CELL, "Sperm cells swim with beating tails towards an egg cell."),
    12: (SUBCELL, "A mitochondrion's inner membrane folds into cristae where ATP is made."),
    60: (ORGAN, "Kidney glomeruli filter blood plasma into the surrounding capsule."),
    126: (CELL, "Sickle-shaped red blood cells block a narrow capillary."),
    277: (ORGAN, "A skin wound closes as new tissue grows in from its edges."),
    319: (CELL, "Paramecia sweep food into their oral grooves with beating cilia."),
}
"""Task index -> (level, task text)."""

_Pattern = tuple[tuple[int, float], ...]
PATTERNS: dict[str, tuple[_Pattern, ...]] = {
    "scientific": (
        ((1, 1.0), (1, 1.0), (1, 1.0), (1, 1.0), (-1, 1.0)),
        ((1, 1.0), (1, 1.0), (1, 1.0), (1, 0.5), (-1, 1.0)),
        ((1, 1.0), (1, 1.0), (1, 0.5), (1, 0.5), (1, 0.0)),
    ),
    "visual": (
        ((1, 0.5), (1, 0.5), (1, 0.2), (1, 0.2), (-1, 0.0)),
        ((1, 0.5), (1, 0.5), (1, 0.2), (1, 0.2), (1, 0.2)),
        ((1, 0.5), (1, 0.5), (1, 0.5), (1, 0.2), (-1, 0.2)),
    ),
    "instruction": (
        ((1, 0.5), (1, 0.5), (1, 0.2), (1, 0.2), (-1, 0.5)),
        ((1, 0.5), (1, 0.5), (1, 0.5), (1, 0.2), (1, 0.0)),
        ((1, 0.5), (1, 0.2), (1, 0.2), (1, 0.0), (-1, 0.5)),
    ),
}
"""(sign, norm weight) per criterion; task ``i`` uses pattern ``i % 3`` of each dimension."""

FOUR_CRITERIA: dict[tuple[int, str], _Pattern] = {(277, "instruction"): ((1, 0.5), (1, 0.5), (1, 0.0), (-1, 0.5))}
"""(task, dimension) -> the block's only four criteria."""
RENUMBERED = frozenset({(2, "instruction"), (9, "instruction"), (60, "scientific"), (319, "visual")})
"""(task, dimension) of the blocks numbered ``d11..d55``."""
STRING_WEIGHTS: dict[tuple[int, str, int], str] = {
    (1, "scientific", 2): "1.0",
    (60, "scientific", 1): "1.0",
    (126, "scientific", 4): "1.",
}
"""(task, dimension, criterion number) -> the weight as both files write it (a string)."""

_RAW_WEIGHTS = {1.0: "2.0", 0.5: "1.0", 0.2: "0.7", 0.0: "0.5"}
_TOPICS = {
    1: "the structures and their motion match the described biology",
    -1: "the video shows a physically or biologically impossible event",
}


def _block(index: int, dimension: str, raw: bool) -> dict[str, Any]:
    """One rubric block as the raw (``raw=True``) or the norm file writes it."""
    pattern = FOUR_CRITERIA.get((index, dimension)) or PATTERNS[dimension][index % 3]
    block: dict[str, Any] = {}
    for k, (sign, weight) in enumerate(pattern, 1):
        key = str(k) * 2 if (index, dimension) in RENUMBERED else str(k)
        written = STRING_WEIGHTS.get((index, dimension, k))
        block[f"d{key}"] = f"{dimension.capitalize()} point {k} of task {index}: {_TOPICS[sign]}."
        block[f"s{key}"] = "+1" if sign > 0 else "-1"
        block[f"w{key}"] = written or (_RAW_WEIGHTS[weight] if raw else weight)
    return block


def _requirement(text: str) -> str:
    return f"Create a scientifically accurate microscopy video: {text} Keep the scale and motion realistic."


def _rubric_entries(raw: bool) -> list[dict[str, Any]]:
    text_keys = ("task", "requirement") if raw else ("任务", "具体要求")
    return [
        {
            "index": index,
            text_keys[0]: text,
            text_keys[1]: _requirement(text),
            **{f"rubrics_{dim}": _block(index, dim, raw) for dim in PATTERNS},
        }
        for index, (_, text) in TASKS.items()
    ]


def _task_entries() -> list[dict[str, Any]]:
    return [
        {
            "index": index,
            "id": f"synthetic-{index}",
            "任务": text,
            "具体要求": _requirement(text),
            "类别": "器官" if level == ORGAN else "细胞或分子",
            "final_label": level,
            "classification_confidence": 9,
            "classification_reason": "synthetic test task",
            "classification_time": "2025-01-01 00:00:00",
            "任务中文": text,
            "具体要求中文": _requirement(text),
            "translation_time": "2025-01-01 00:00:00",
            "runway_gen4_task_id": "",
            "状态": "succeeded",
            "video_url": "",
            "下载完成": 0,
            "本地文件": f"videos/{index}.mp4",
        }
        for index, (level, text) in TASKS.items()
    ]


def write_microworldbench(folder: Path) -> Path:
    """Write the synthetic set's three files into ``folder`` (created if needed) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "MWBenchRubrics.json": _rubric_entries(raw=True),
        "MWBenchRubrics_norm.json": _rubric_entries(raw=False),
        "finaltasks.json": _task_entries(),
    }
    for name, entries in files.items():
        (folder / name).write_text(json.dumps(entries, ensure_ascii=False, indent=2), encoding="utf-8")
    return folder
