"""media.video: the one mp4 writer (deterministic), probing, decoding, frame sampling, resizing."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import imageio_ffmpeg
import numpy as np
import pytest

from media.video import (
    DecodeError,
    VideoInfo,
    encode_mp4,
    frame_positions,
    probe_video,
    read_video,
    resize_crop,
    sample_frames,
    thumbnail,
    valid_frame_count,
    write_mp4,
)


def _ramp(n: int = 16, height: int = 48, width: int = 48, seed: int = 0) -> np.ndarray:
    """Frames whose red level is ``10 * index`` (plus noise), so decoded frames tell their index."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = np.clip(rng.normal(60, 4, (height, width, 3)), 0, 255)
        frames[i, ..., 0] = 10 * i
    return frames


def test_encoder_gives_identical_bytes_for_identical_frames():
    frames, other = _ramp(), _ramp(seed=1)
    first = encode_mp4(frames, 8)
    encode_mp4(other, 8)  # a different history before the next encode
    with ThreadPoolExecutor(4) as pool:  # and encoders running side by side
        again = list(pool.map(lambda f: encode_mp4(f, 8), [frames, other, frames, other]))
    assert again[0] == again[2] == first and again[1] == again[3] != first


def test_encoder_rejects_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 16, 16, 3), np.float32), 8)


def test_write_then_read_round_trip(tmp_path):
    frames = _ramp()
    path = write_mp4(tmp_path / "sub" / "v.mp4", frames, 8)
    assert path.is_file() and not list(path.parent.glob("*.part"))
    for source in (path, str(path), path.read_bytes()):
        decoded, fps = read_video(source)
        assert decoded.shape == frames.shape and fps == 8.0
        assert np.abs(decoded.astype(float) - frames).mean() < 4
    assert encode_mp4(frames, 30000 / 1001)  # NTSC rates are written as the exact fraction
    assert read_video(encode_mp4(frames, 30000 / 1001))[1] == pytest.approx(29.97, abs=0.01)


def test_probe_video_reads_count_size_and_rate(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", _ramp(12, 32, 48), 8)
    for source in (path, str(path), path.read_bytes()):
        assert probe_video(source) == VideoInfo(frames=12, height=32, width=48, fps=8.0)
    mkv = tmp_path / "v.mkv"  # Matroska declares no frame count: counted by decoding unless told not to
    remux = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-c", "copy", str(mkv)]
    subprocess.run(remux, check=True)
    assert probe_video(mkv).frames == 12 and probe_video(mkv, count_frames=False).frames == 0
    with pytest.raises(DecodeError):
        probe_video(b"definitely not an mp4")


def test_read_video_window_and_resampling(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", _ramp(), 8)
    half, fps = read_video(path, fps=4)
    assert fps == 4.0 and len(half) == 8
    window, _ = read_video(path, start=0.5, end=1.0)
    assert [round(float(f[..., 0].mean()) / 10) for f in window] == [4, 5, 6, 7]
    empty, _ = read_video(path, start=5.0)
    assert empty.shape == (0, 0, 0, 3)


def test_sampling_rules():
    assert frame_positions(17, 5) == [0, 4, 8, 12, 16]
    assert frame_positions(81, 8, "centres") == [5, 15, 25, 35, 45, 55, 65, 75]
    assert frame_positions(3, 8, "centres") == [0, 0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(DecodeError):
        frame_positions(0, 4)
    data = encode_mp4(_ramp(), 8)
    for rule in ("endpoints", "centres"):
        levels = [round(float(f[..., 0].mean()) / 10) for f in sample_frames(data, 8, rule)]
        assert levels == frame_positions(16, 8, rule)


def test_undecodable_input_raises_decode_error(tmp_path):
    with pytest.raises(DecodeError):
        sample_frames(b"definitely not an mp4", 4)
    with pytest.raises(DecodeError):
        read_video(tmp_path / "missing.mp4")


def test_thumbnail_resize_and_frame_counts():
    frames = _ramp(3, 32, 48)
    assert thumbnail(frames)[:4] == b"RIFF"
    assert resize_crop(frames, 16, 16).shape == (3, 16, 16, 3)
    assert resize_crop(frames, 64, 64).shape == (3, 64, 64, 3)
    assert [valid_frame_count(n) for n in (0, 1, 8, 9, 81)] == [0, 1, 5, 9, 81]
    assert valid_frame_count(100, max_frames=17) == 17
