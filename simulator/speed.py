"""Render speed of the simulator: clips per second of ``render_clip``, alone or with mp4 encoding."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from media.video import encode_mp4

from .dataset import CRF
from .render import PROCESSES, render_clip

logger = logging.getLogger(__name__)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the ffmpeg encoders)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def clips_per_second(n_clips: int = 300, size: int = 64, frames: int = 17, encode: bool = False) -> tuple[float, float]:
    """Clips per wall-clock second and per CPU second of ``render_clip`` (plus mp4 encoding when ``encode``).

    The CPU-second rate is what one uncontended core would give; the wall rate drops when the core is shared.
    """
    names = list(PROCESSES)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    for i in range(n_clips):
        clip = render_clip(names[i % len(names)], i, size, frames)
        if encode:
            encode_mp4(clip.frames, 16, CRF)
    return n_clips / (time.perf_counter() - wall), n_clips / (_cpu_seconds() - cpu)


@contextmanager
def _one_core() -> Iterator[None]:
    """Pin this process (and the encoders it starts) to one core where the OS allows it."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def single_core_speed(n_clips: int = 600, size: int = 64, frames: int = 17) -> dict[str, tuple[float, float]]:
    """``{"render only": rates, "render + encode": rates}`` on one core; rates as :func:`clips_per_second`."""
    with _one_core():
        return {
            "render only": clips_per_second(n_clips, size, frames),
            "render + encode": clips_per_second(n_clips, size, frames, encode=True),
        }
