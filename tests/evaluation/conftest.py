"""Fixtures of the evaluation tests: the published benchmark, tiny videos, a loopback judge."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest

from evaluation.benchmark import Benchmark, load_benchmark
from evaluation.fake_judge import FakeJudgeServer
from evaluation.judge import JudgeConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO_ROOT / ".." / "shared" / "microworldbench"


def write_video(path: Path, n_frames: int = 16, size: int = 32, seed: int = 0) -> Path:
    """Write an mp4 whose frame i is a flat grey of level 10 * i (plus a seeded tint)."""
    tint = seed % 50
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(n_frames):
            frame = np.full((size, size, 3), 10 * i, dtype=np.uint8)
            frame[..., 2] = np.uint8(tint)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for subprocesses that must import this checkout's packages."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@pytest.fixture(scope="session")
def bench_dir() -> Path:
    """The published benchmark files beside the repository."""
    return BENCH_DIR


@pytest.fixture(scope="session")
def make_video():
    """``make_video(path, n_frames=16, size=32, seed=0)`` writes a tiny mp4."""
    return write_video


@pytest.fixture(scope="session")
def bench() -> Benchmark:
    if not BENCH_DIR.is_dir():
        pytest.fail(f"shared benchmark files not found at {BENCH_DIR}")
    return load_benchmark(BENCH_DIR)


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
