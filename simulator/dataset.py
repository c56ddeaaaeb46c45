"""Simulator datasets: H.264 clips plus ``metadata.json`` (MicroSim format) and a ``ground_truth.jsonl`` sidecar.

The files depend only on the arguments of :func:`write_dataset`, not on its worker count: every clip is rendered
from its own seed and written by ``media.video``'s deterministic encoder.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from media.video import write_mp4

from .render import LOOKS, PROCESSES, check_looks, clip_seeds, render_clip

logger = logging.getLogger(__name__)

CRF = 18
"""H.264 constant rate factor of the clips."""


@dataclass(frozen=True)
class _Job:
    """One clip to render and write."""

    clip_id: str
    """Id, also the video's file name."""
    process: str
    """Registry name of the process."""
    seed: int
    """Seed of the clip."""
    size: int
    """Frame height and width."""
    frames: int
    """Frames per clip."""
    fps: int
    """Frame rate of the mp4."""
    out_dir: Path
    """Dataset folder."""
    looks: tuple[str, ...]
    """Looks the clip's look is drawn from."""


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return np.round(value, 3).tolist() if value.dtype.kind == "f" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_one(job: _Job) -> tuple[dict, dict]:
    """Render and write one clip; returns its metadata entry and its ground-truth line."""
    clip = render_clip(job.process, job.seed, job.size, job.frames, job.looks)
    rel = f"videos/{job.clip_id}.mp4"
    write_mp4(job.out_dir / rel, clip.frames, job.fps, CRF)
    entry = {
        "id": job.clip_id,
        "video": rel,
        "prompt": clip.prompt,
        "process": job.process,
        "params": clip.params,
        "level": clip.level,
        "seed": job.seed,
        "size": job.size,
        "frames": job.frames,
        "fps": job.fps,
    }
    truth = {"id": job.clip_id, **{k: _jsonable(v) for k, v in clip.truth.items()}}
    return entry, truth


def write_dataset(
    out_dir: str | Path,
    n_clips: int,
    size: int = 64,
    frames: int = 17,
    fps: int = 16,
    seed: int = 0,
    processes: Sequence[str] | None = None,
    workers: int = 1,
    looks: Sequence[str] = LOOKS,
) -> Path:
    """Write ``n_clips`` simulator clips to ``out_dir``; returns the path of ``metadata.json``.

    Layout: ``videos/<id>.mp4`` (H.264), ``metadata.json`` (MicroSim format: a JSON array of
    ``{"id", "video", "prompt"}`` plus ``process``, ``params``, ``level``, ``seed``, ``size``,
    ``frames``, ``fps``) and ``ground_truth.jsonl`` (one line per clip: ``id`` and per-frame truth).
    Processes are assigned round-robin, each clip's look is drawn from ``looks``; every file is byte-identical
    for the same arguments, whatever ``workers``.
    """
    processes = list(processes or PROCESSES)
    unknown = sorted(set(processes) - set(PROCESSES))
    if unknown:
        raise KeyError(f"unknown processes {unknown}; choose from {sorted(PROCESSES)}")
    check_looks(looks)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, clip_seed in enumerate(clip_seeds(seed, n_clips)):
        process = processes[i % len(processes)]
        jobs.append(_Job(f"{process}_{i:06d}", process, clip_seed, size, frames, fps, out, tuple(looks)))
    with contextlib.ExitStack() as stack:
        if workers > 1:
            results = stack.enter_context(get_context("fork").Pool(workers)).imap(_write_one, jobs, chunksize=16)
        else:
            results = map(_write_one, jobs)
        done = list(tqdm(results, total=n_clips, desc="simulate", unit="clip", disable=n_clips < 50))
    meta = out / "metadata.json"
    meta.write_text(json.dumps([entry for entry, _ in done], indent=1))
    (out / "ground_truth.jsonl").write_text("".join(json.dumps(truth) + "\n" for _, truth in done))
    logger.info("wrote %d clips to %s", n_clips, out)
    return meta
