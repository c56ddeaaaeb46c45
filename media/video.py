"""Frames to files and back: the one H.264 mp4 writer, probing, decoding, frame sampling, resizing, thumbnails.

Writing runs the ffmpeg binary that ``imageio-ffmpeg`` ships, in a fresh process per video, single-threaded
and without x264's macroblock-tree rate control, so identical frames always give identical bytes (see
:func:`encode_mp4`). Reading decodes with PyAV into uint8 RGB arrays ``(T, H, W, 3)``.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

VideoSource = bytes | str | Path
"""An encoded video: its bytes or a path."""
Positions = Literal["endpoints", "centres"]
"""Where ``count`` frames are sampled in ``total``: ``endpoints`` spreads them evenly from the first to the last
frame (``round(linspace(0, total - 1, count))``); ``centres`` takes the centre of each of ``count`` equal
segments (``floor((i + 0.5) * total / count)``, the positions MicroWorldBench's judge publishes)."""

X264_PARAMS = "mbtree=0"
"""x264 options of every mp4. Macroblock-tree rate control is off: at frame widths of an odd number of
macroblocks (48 or 80 px) x264 core 165's mbtree propagation reads uninitialised stack memory (valgrind), so
its output depended on what the encoding process had run before (in-process PyAV encoders gave different
bytes for the same frames depending on the previous clips and the worker count)."""


class DecodeError(ValueError):
    """A video cannot be decoded, has no video stream or has no frames."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` reads of a video's first video stream."""

    frames: int
    """Number of frames: the container's count, else counted by decoding (0 when not counted)."""
    height: int
    """Frame height in pixels."""
    width: int
    """Frame width in pixels."""
    fps: float
    """Average frame rate (0.0 when the container declares none)."""


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 17) -> bytes:
    """Encode uint8 frames ``(T, H, W, 3)`` as H.264 yuv420p mp4 at ``fps``; returns the bytes.

    Deterministic: identical frames and arguments give identical bytes whatever the machine's load, its core
    count or what the calling process did before (one fresh ffmpeg process per video, one encoder and one
    filter thread, no macroblock-tree rate control: :data:`X264_PARAMS`).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    rate = str(Fraction(fps).limit_denominator(1001))
    with tempfile.TemporaryDirectory(prefix="media-enc-") as tmp:
        out = Path(tmp) / "video.mp4"
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-filter_threads", "1",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", rate, "-i", "-",
               "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-x264-params", X264_PARAMS,
               "-threads", "1", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if proc.returncode != 0:
            raise OSError(f"ffmpeg failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
        return out.read_bytes()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and fsync, so a crash leaves no partial file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 17) -> Path:
    """:func:`encode_mp4` the frames into ``path`` (atomically, creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, encode_mp4(frames, fps, crf))
    return path


def thumbnail(frames: np.ndarray, fmt: str = "webp") -> bytes:
    """The middle frame as an image (webp by default)."""
    buf = io.BytesIO()
    Image.fromarray(frames[len(frames) // 2]).save(buf, format=fmt.upper())
    return buf.getvalue()


@contextmanager
def _opened(source: VideoSource) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """The container and its first video stream; PyAV's errors, while open, become :class:`DecodeError`."""
    try:
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            if not container.streams.video:
                raise DecodeError("file has no video stream")
            yield container, container.streams.video[0]
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise DecodeError(f"cannot decode video: {exc}") from exc


def probe_video(source: VideoSource, count_frames: bool = True) -> VideoInfo:
    """Frame count, size and frame rate of a video (path or bytes), without converting frames to RGB.

    When the container declares no frame count the stream is decoded to count them, unless ``count_frames``
    is False (then ``frames`` is 0: for callers that need only the size or the rate of long videos).
    """
    with _opened(source) as (container, stream):
        frames = stream.frames
        if not frames and count_frames:
            frames = sum(1 for _ in container.decode(stream))
        codec = stream.codec_context
        return VideoInfo(frames, codec.height, codec.width, float(stream.average_rate or 0))


def read_video(
    source: VideoSource, fps: float | None = None, start: float = 0.0, end: float | None = None
) -> tuple[np.ndarray, float]:
    """Decode ``[start, end)`` seconds of a video (path or bytes) as uint8 RGB ``(T, H, W, 3)``.

    With ``fps`` the frames are resampled to that rate (nearest source frame per output tick); returns the
    frames (``(0, 0, 0, 3)`` when the window holds none) and their frame rate.
    """
    with _opened(source) as (container, stream):
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


def frame_positions(total: int, count: int, positions: Positions = "endpoints") -> list[int]:
    """Indices of ``count`` frames sampled from ``total`` by the rule ``positions`` (see :data:`Positions`)."""
    if total <= 0:
        raise DecodeError("video has no frames")
    if positions == "centres":
        return [int((i + 0.5) * total / count) for i in range(count)]
    return [int(i) for i in np.linspace(0, total - 1, count).round()]


def sample_frames(source: VideoSource, count: int, positions: Positions = "endpoints") -> np.ndarray:
    """``count`` frames ``(count, H, W, 3)`` of a video (path or bytes) at ``positions`` (frames repeat if it is
    shorter); only the sampled frames are converted to RGB when the container declares its frame count."""
    with _opened(source) as (container, stream):
        if stream.frames > 0:
            wanted = frame_positions(stream.frames, count, positions)
            kept = {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
            if len(kept) == len(set(wanted)):
                return np.stack([kept[p] for p in wanted])
            container.seek(0)  # the declared count was wrong: decode everything
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack([frames[p] for p in frame_positions(len(frames), count, positions)])


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale so the frames cover ``height x width``, then centre-crop to it."""
    h, w = frames.shape[1:3]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    top, left = (nh - height) // 2, (nw - width) // 2
    return np.stack(
        [cv2.resize(f, (nw, nh), interpolation=interp)[top : top + height, left : left + width] for f in frames]
    )


def valid_frame_count(n: int, max_frames: int | None = None) -> int:
    """Largest ``4k + 1`` not above ``n`` (and ``max_frames``), 0 if ``n < 1``."""
    n = min(n, max_frames) if max_frames else n
    return 0 if n < 1 else (n - 1) // 4 * 4 + 1
