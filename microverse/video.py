"""Frames to files: H.264 mp4 (yuv420p) through PyAV, and thumbnails through Pillow."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 17) -> bytes:
    """Encode uint8 frames (T, H, W, 3) as H.264 yuv420p mp4 at ``fps``; returns the bytes.

    Runs the ffmpeg binary that ``imageio-ffmpeg`` ships, in its own process: in-process libx264
    (through PyAV) produced different bitstreams for identical frames when threads were busy, and
    a seed must reproduce the same file.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="microverse-enc-") as tmp:
        out = Path(tmp) / "video.mp4"
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
               "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf), "-pix_fmt", "yuv420p",
               "-movflags", "+faststart", str(out)]
        proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
        if proc.returncode != 0:
            raise OSError(f"ffmpeg failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
        return out.read_bytes()


def thumbnail(frames: np.ndarray, fmt: str = "webp") -> bytes:
    """The middle frame as an image (webp by default)."""
    buf = io.BytesIO()
    Image.fromarray(frames[len(frames) // 2]).save(buf, format=fmt.upper())
    return buf.getvalue()


def read_mp4(data: bytes | str | Path) -> tuple[np.ndarray, float]:
    """Decode a video into uint8 frames (T, H, W, 3) and its frame rate."""
    src = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(src) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate or 0)
    if not frames:
        raise ValueError("the video has no frames")
    return np.stack(frames), fps


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and fsync, so a crash leaves no partial file."""
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
