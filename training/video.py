"""Video reading, normalising and writing (PyAV decode/encode, OpenCV resize)."""

from __future__ import annotations

import logging
from pathlib import Path

import av
import cv2
import numpy as np

logger = logging.getLogger(__name__)


def read_video(
    path: str | Path, fps: float | None = None, start: float = 0.0, end: float | None = None
) -> tuple[np.ndarray, float]:
    """Decode ``[start, end)`` seconds of a video as uint8 RGB ``[T, H, W, 3]``.

    With ``fps`` the frames are resampled to that rate (nearest source frame per output tick);
    returns the frames and their frame rate.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        frames, times = [], []
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else len(times) / float(stream.average_rate)
            if t < start - 1e-6:
                continue
            if end is not None and t >= end - 1e-6:
                break
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(t)
        native_fps = float(stream.average_rate or 0) or fps or 16.0
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8), fps or native_fps
    video = np.stack(frames)
    if fps is None:
        return video, native_fps
    times_arr = np.asarray(times)
    duration = times_arr[-1] - times_arr[0] + 1.0 / native_fps
    ticks = times_arr[0] + np.arange(int(np.floor(duration * fps + 1e-6))) / fps
    idx = np.abs(times_arr[None, :] - ticks[:, None]).argmin(axis=1)
    return video[idx], float(fps)


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale so the frames cover ``height x width``, then centre-crop to it."""
    h, w = frames.shape[1:3]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.stack([cv2.resize(f, (nw, nh), interpolation=interp)[top : top + height, left : left + width] for f in frames])


def valid_frame_count(n: int, max_frames: int | None = None) -> int:
    """Largest ``4k + 1`` not above ``n`` (and ``max_frames``), 0 if ``n < 1``."""
    n = min(n, max_frames) if max_frames else n
    return 0 if n < 1 else (n - 1) // 4 * 4 + 1


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Encode uint8 RGB ``[T, H, W, 3]`` frames as H.264 (yuv420p) MP4."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def sample_frames(path: str | Path, n: int) -> np.ndarray:
    """``n`` frames spread uniformly over a video (frames repeat if it is shorter)."""
    frames, _ = read_video(path)
    if len(frames) == 0:
        raise ValueError(f"{path}: no frames")
    return frames[np.linspace(0, len(frames) - 1, n).round().astype(int)]
