"""Physics analysers: measure back from pixels what the micro-world simulator controls.

They work on ``uint8`` frames ``(T, H, W, 3)`` (or an mp4 path): blobs are found per frame as
connected components of the absolute deviation from the frame's median (so fluorescence blobs and
dark brightfield cells are both foreground), linked into tracks by nearest neighbour, and turned
into blob counts, foreground area, mean squared displacement slope (diffusion coefficient in
px^2/frame), mean velocity (tracking, cross-checked by Farneback optical flow) and net drift toward
a source. ``analyse`` runs them all; ``evaluation.physics`` compares the result with a clip's parameters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from media.video import read_video

logger = logging.getLogger(__name__)


@dataclass
class AnalysisConfig:
    """Settings of blob detection and tracking."""

    blur_sigma: float = 1.0
    """Gaussian blur (px) applied to the foreground map before thresholding."""
    rel_threshold: float = 0.4
    """Foreground threshold as a fraction of the video's 99.9th-percentile foreground value."""
    noise_factor: float = 6.0
    """Foreground threshold floor as a multiple of the median foreground value (the noise level)."""
    min_area: int = 3
    """Smallest connected component (px) counted as a blob."""
    max_link_fraction: float = 1 / 6
    """Largest frame-to-frame displacement linked into a track, as a fraction of the frame width."""
    max_lag: int = 4
    """Largest lag (frames) in the mean squared displacement fit."""


@dataclass
class Blobs:
    """Blobs of one frame."""

    centroids: np.ndarray
    """Intensity-weighted centres ``(K, 2)`` as x, y."""
    areas: np.ndarray
    """Areas in pixels ``(K,)``."""


@dataclass
class Measurement:
    """What the analysers measured from one video (lengths in px, time in frames)."""

    counts: list[int]
    """Blob count per frame."""
    areas: list[float]
    """Total foreground area per frame."""
    velocity: tuple[float, float]
    """Median frame-to-frame displacement of linked blobs (x right, y down)."""
    flow_velocity: tuple[float, float]
    """Mean Farneback optical flow over foreground pixels (cross-check of ``velocity``)."""
    diffusion_coefficient: float
    """MSD slope / 4 after removing the drift ``velocity`` (nan without tracks of length > 1)."""
    n_links: int
    """Number of frame-to-frame links."""
    drift_toward_source: float | None = None
    """Mean displacement per frame projected on the direction to the source (when one is given)."""


def load_video(source: np.ndarray | str | Path) -> np.ndarray:
    """Frames as ``uint8`` ``(T, H, W, 3)`` from an array (uint8, or float in [0, 1]) or a video file."""
    if isinstance(source, (str, Path)):
        source = read_video(source)[0]
    frames = np.asarray(source)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    return frames


def foreground(frames: np.ndarray, cfg: AnalysisConfig | None = None) -> np.ndarray:
    """``(T, H, W)`` float32 absolute deviation of each frame from its median, blurred."""
    cfg = cfg or AnalysisConfig()
    gray = frames.astype(np.float32).mean(axis=-1)
    dev = np.abs(gray - np.median(gray, axis=(1, 2), keepdims=True))
    return np.stack([cv2.GaussianBlur(f, (0, 0), cfg.blur_sigma) for f in dev])


def threshold(fg: np.ndarray, cfg: AnalysisConfig | None = None) -> float:
    """One foreground threshold for a whole video: relative to its brightest blobs, above its noise."""
    cfg = cfg or AnalysisConfig()
    return float(max(cfg.rel_threshold * np.percentile(fg, 99.9), cfg.noise_factor * np.median(fg), 1.0))


def detect_blobs(frames: np.ndarray, cfg: AnalysisConfig | None = None) -> tuple[list[Blobs], np.ndarray]:
    """Blobs of every frame, and the foreground masks ``(T, H, W)`` bool."""
    cfg = cfg or AnalysisConfig()
    return blobs_from_foreground(foreground(frames, cfg), cfg)


def blobs_from_foreground(fg: np.ndarray, cfg: AnalysisConfig | None = None) -> tuple[list[Blobs], np.ndarray]:
    """``detect_blobs`` on a precomputed ``foreground`` map."""
    cfg = cfg or AnalysisConfig()
    masks = fg > threshold(fg, cfg)
    yy, xx = np.mgrid[0 : fg.shape[1], 0 : fg.shape[2]]
    out = []
    for f, m in zip(fg, masks, strict=True):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= cfg.min_area) + 1
        lab = labels.ravel()
        w = np.bincount(lab, f.ravel(), n)
        cx = np.bincount(lab, (f * xx).ravel(), n) / np.maximum(w, 1e-9)
        cy = np.bincount(lab, (f * yy).ravel(), n) / np.maximum(w, 1e-9)
        out.append(Blobs(np.stack([cx[keep], cy[keep]], axis=1), stats[keep, cv2.CC_STAT_AREA].astype(float)))
    return out, masks


def link_tracks(blobs: Sequence[Blobs], max_distance: float) -> list[np.ndarray]:
    """Greedy nearest-neighbour linking; returns tracks as ``(n, 3)`` arrays of (frame, x, y)."""
    tracks = [[(0.0, x, y)] for x, y in blobs[0].centroids] if blobs else []
    owner = {i: i for i in range(len(tracks))}
    for t in range(1, len(blobs)):
        prev, cur = blobs[t - 1].centroids, blobs[t].centroids
        new_owner: dict[int, int] = {}
        if len(prev) and len(cur):
            d = np.linalg.norm(prev[:, None, :] - cur[None, :, :], axis=-1)
            used_p, used_c = set(), set()
            for flat in np.argsort(d, axis=None):
                p, c = divmod(int(flat), d.shape[1])
                if d[p, c] > max_distance:
                    break
                if p in used_p or c in used_c:
                    continue
                used_p.add(p)
                used_c.add(c)
                new_owner[c] = owner[p]
        for c, (x, y) in enumerate(cur):
            if c not in new_owner:
                new_owner[c] = len(tracks)
                tracks.append([])
            tracks[new_owner[c]].append((t, x, y))
        owner = new_owner
    return [np.asarray(tr, float) for tr in tracks if len(tr) > 1]


def _links(tracks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Start positions ``(L, 2)`` and displacements ``(L, 2)`` of all frame-to-frame links."""
    if not tracks:
        return np.zeros((0, 2)), np.zeros((0, 2))
    starts = np.concatenate([tr[:-1, 1:] for tr in tracks])
    steps = np.concatenate([np.diff(tr[:, 1:], axis=0) for tr in tracks])
    return starts, steps


def msd_diffusion(tracks: Sequence[np.ndarray], drift: np.ndarray, max_lag: int = 4) -> float:
    """Diffusion coefficient (px^2/frame): slope / 4 of the drift-corrected MSD over lags 1..max_lag.

    The MSD at each lag is estimated robustly as median(|d|^2) / ln 2 (exact for Brownian motion).
    """
    lags, msd = [], []
    for lag in range(1, max_lag + 1):
        sq = [np.sum((tr[lag:, 1:] - tr[:-lag, 1:] - lag * drift) ** 2, axis=1) for tr in tracks if len(tr) > lag]
        if sq:  # median / ln 2 is the mean of a 2-D Gaussian |d|^2, robust to merge/split jumps
            lags.append(lag)
            msd.append(float(np.median(np.concatenate(sq)) / math.log(2)))
    if not lags:
        return float("nan")
    lag_arr, msd_arr = np.asarray(lags, float), np.asarray(msd)
    return float(lag_arr @ msd_arr / (lag_arr @ lag_arr) / 4)  # MSD = 4 D lag, fitted through the origin


def optical_flow_velocity(fg: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """Mean Farneback flow (px/frame) of a ``foreground`` map over pixels that are foreground in the earlier frame."""
    img = np.clip(fg * (255.0 / max(float(fg.max()), 1e-6)), 0, 255).astype(np.uint8)
    total, n = np.zeros(2), 0
    for t in range(len(img) - 1):
        if not masks[t].any():
            continue
        flow = cv2.calcOpticalFlowFarneback(img[t], img[t + 1], None, 0.5, 3, 9, 3, 5, 1.1, 0)
        total += flow[masks[t]].sum(axis=0)
        n += int(masks[t].sum())
    return (float(total[0] / n), float(total[1] / n)) if n else (0.0, 0.0)


def analyse(
    video: np.ndarray | str | Path, source: Sequence[float] | None = None, cfg: AnalysisConfig | None = None
) -> Measurement:
    """Run every analyser on a video; ``source`` (x, y in px) enables the drift-toward-source measure."""
    cfg = cfg or AnalysisConfig()
    frames = load_video(video)
    fg = foreground(frames, cfg)
    blobs, masks = blobs_from_foreground(fg, cfg)
    tracks = link_tracks(blobs, cfg.max_link_fraction * frames.shape[2])
    starts, steps = _links(tracks)
    velocity = np.median(steps, axis=0) if len(steps) else np.zeros(2)
    drift = None
    if source is not None and len(steps):
        to_src = np.asarray(source, float) - starts
        drift = float(np.mean(np.sum(steps * to_src, axis=1) / np.maximum(np.linalg.norm(to_src, axis=1), 1e-6)))
    return Measurement(
        counts=[len(b.centroids) for b in blobs],
        areas=[float(b.areas.sum()) for b in blobs],
        velocity=(float(velocity[0]), float(velocity[1])),
        flow_velocity=optical_flow_velocity(fg, masks),
        diffusion_coefficient=msd_diffusion(tracks, velocity, cfg.max_lag),
        n_links=len(steps),
        drift_toward_source=drift,
    )
