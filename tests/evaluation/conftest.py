"""Fixtures of the evaluation tests: the synthetic benchmark loaded, tiny videos, a loopback judge."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from evaluation.fake_judge import FakeJudgeServer
from evaluation.judge import JudgeConfig
from evaluation.microworldbench import DIMENSIONS, Benchmark, load_benchmark
from evaluation.scoring import Summary, score_task, summarize
from media.video import write_mp4

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_video(path: Path, n_frames: int = 16, size: int = 32, seed: int = 0) -> Path:
    """Write an mp4 at 8 fps whose frame i is a flat grey of level 10 * i (plus a seeded tint)."""
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    frames[:] = (10 * np.arange(n_frames)).astype(np.uint8)[:, None, None, None]
    frames[..., 2] = seed % 50
    return write_mp4(path, frames, fps=8, crf=10)


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for subprocesses that must import this checkout's packages."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@pytest.fixture(scope="session")
def make_video():
    """``make_video(path, n_frames=16, size=32, seed=0)`` writes a tiny mp4."""
    return write_video


@pytest.fixture(scope="session")
def bench(bench_dir: Path) -> Benchmark:
    """The synthetic benchmark (``bench_dir``), loaded."""
    return load_benchmark(bench_dir)


def _naive_scores(entry: dict, judgements: dict[str, list[int]]) -> tuple[dict[str, float], float]:
    """Straight from the published JSON: pair k-th criterion (any numbering) with k-th judgement."""
    total_r = total_m = 0.0
    dims = {}
    for dim in DIMENSIONS:
        block = entry[f"rubrics_{dim}"]
        nums = sorted(int(k[1:]) for k in block if k.startswith("s"))
        r = sum(
            x * (1 if block[f"s{n}"] == "+1" else -1) * float(block[f"w{n}"])
            for x, n in zip(judgements[dim], nums, strict=True)
        )
        m = sum(float(block[f"w{n}"]) for n in nums if block[f"s{n}"] == "+1")
        dims[dim] = max(0.0, r / m) * 100
        total_r += r
        total_m += m
    return dims, max(0.0, total_r / total_m) * 100


def _random_judgement_regression(benchmark: Benchmark, folder: Path) -> Summary:
    """Score every task of ``benchmark`` with seeded random judgements, checking each task against the
    published formula applied to ``folder``'s ``MWBenchRubrics_norm.json`` as written; returns the summary."""
    norm = {t["index"]: t for t in json.loads((folder / "MWBenchRubrics_norm.json").read_text())}
    rng = random.Random(1234)
    scores = []
    for index, task in sorted(benchmark.tasks.items()):
        judgements = {d: [rng.randint(0, 1) for _ in task.rubrics[d]] for d in DIMENSIONS}
        got = score_task(task, judgements)
        dims, pooled = _naive_scores(norm[index], judgements)
        assert got.dimensions == pytest.approx(dims) and got.score == pytest.approx(pooled), index
        scores.append(got)
    return summarize(scores, n_resamples=500)


@pytest.fixture(scope="session")
def random_judgement_regression():
    """``random_judgement_regression(benchmark, folder) -> Summary``: every task scored with seeded random
    judgements, each checked against the published formula on the folder's files as written."""
    return _random_judgement_regression


@pytest.fixture()
def fake_judge():
    with FakeJudgeServer() as server:
        yield server


@pytest.fixture()
def judge_config(fake_judge: FakeJudgeServer) -> JudgeConfig:
    return JudgeConfig(
        base_url=fake_judge.base_url,
        api_key="test",
        model="fake-judge",
        max_retries=3,
        price_input_per_mtok=2.5,
        price_output_per_mtok=10.0,
    )


@pytest.fixture()
def videos_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    for index in (1, 2, 3, 60, 277, 319):
        write_video(folder / f"{index}.mp4", seed=index)
    return folder
