"""Helpers of the training tests: synthetic clips (microscopy-like blobs, off-topic colour bars)
and debug-config construction."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.config import TrainConfig, load_config


def blobs(
    n: int, size: tuple[int, int], seed: int, background: int = 20, polarity: int = 1, speed: float = 1.5
) -> np.ndarray:
    """Microscopy-like clip: soft fluorescent blobs drifting over a flat background."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[:h, :w].astype(np.float32)
    k = int(rng.integers(3, 6))
    pos = rng.uniform([0, 0], [h, w], size=(k, 2))
    vel = rng.normal(0, speed, size=(k, 2))
    radius = rng.uniform(0.08, 0.16, size=k) * min(h, w)
    frames = []
    for _ in range(n):
        pos = (pos + vel) % [h, w]
        img = np.zeros((h, w), np.float32)
        for (py, px), r in zip(pos, radius, strict=True):
            img += np.exp(-((y - py) ** 2 + (x - px) ** 2) / (2 * r**2))
        v = np.clip(background + polarity * 200 * np.clip(img, 0, 1), 0, 255)
        frames.append(np.stack([v * 0.35, v, v * 0.45], -1))
    return np.asarray(frames).astype(np.uint8)


def colour_bars(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """Off-topic clip: saturated colour bars or stripes scrolling sideways."""
    rng = np.random.default_rng(seed)
    h, w = size
    palette = [[255, 255, 0], [0, 255, 255], [255, 0, 255], [255, 0, 0], [0, 0, 255], [255, 255, 255], [0, 255, 0]]
    colours = rng.permutation(np.array(palette))
    width = int(rng.integers(3, 8))
    step = int(rng.integers(1, 3))
    x = np.arange(w)
    frames = [np.broadcast_to(colours[((x + t * step) // width) % len(colours)][None], (h, w, 3)) for t in range(n)]
    return np.asarray(frames).astype(np.uint8)


def debug_config(out: Path, model: Path, dataset: Path, mode: str = "lora", **fields) -> TrainConfig:
    """The debug config on ``model``/``dataset`` writing to ``out``; ``section__field=value`` sets fields."""
    overrides = [f"model.pretrained={model}", f"data.dataset={dataset}", f"output_dir={out}", f"model.mode={mode}"]
    cfg = load_config("debug", overrides)
    fields.setdefault("export_dtype", "float32")  # exports compared with the fp32 training weights exactly
    for key, value in fields.items():
        section, _, leaf = key.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, leaf, value)
    return cfg
