"""Engine: seeds reproduce, batching does not change a request's video, progress and cancellation."""

import numpy as np
import pytest

from microverse.config import Settings
from microverse.engine import DiffusersEngine, GenerationCancelled
from microverse.schemas import GenerationSpec


def spec(prompt="a cell divides", seed=0, **kw):
    base = dict(prompt=prompt, negative_prompt="", height=32, width=32, num_frames=9, num_inference_steps=4,
                guidance_scale=5.0, seed=seed, fps=8)
    base.update(kw)
    return GenerationSpec(**base)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    return DiffusersEngine.from_settings(Settings(model=str(tiny_model_dir), storage_dir=tmp_path_factory.mktemp("s")))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_same_seed_same_frames_different_seed_different_frames(engine):
    a = engine.generate([spec(seed=1)]).videos[0]
    b = engine.generate([spec(seed=1)]).videos[0]
    c = engine.generate([spec(seed=2)]).videos[0]
    assert a.shape == (9, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert psnr(a, c) < 30


def test_batched_video_equals_unbatched(engine):
    specs = [spec(p, seed=i) for i, p in enumerate(["a cell divides", "red blood cells flowing",
                                                     "dna replication fork", "apoptosis"])]
    batched = engine.generate(specs).videos
    for s, video in zip(specs, batched, strict=True):
        alone = engine.generate([s]).videos[0]
        # Batched GEMMs round differently in the last float bit: at most 1/255 on a few pixels.
        assert np.abs(video.astype(int) - alone).max() <= 1
        assert np.mean(video != alone) < 1e-3
    assert psnr(batched[0], batched[1]) < 30


def test_incompatible_specs_are_refused(engine):
    with pytest.raises(ValueError, match="incompatible"):
        engine.generate([spec(), spec(height=48)])


def test_progress_is_reported_every_step_and_cancel_stops(engine):
    seen = []
    engine.generate([spec(num_inference_steps=5)], on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]
    calls = []
    with pytest.raises(GenerationCancelled):
        engine.generate([spec(num_inference_steps=5)], on_step=lambda i, n: calls.append(i),
                        should_cancel=lambda: len(calls) >= 2)
    assert calls == [1, 2]


def test_info_reports_the_model(make_client):
    info = make_client().get("/info").json()
    assert info["ready"] is True
    assert info["architecture"]["num_layers"] == 2 and info["architecture"]["parameters"] > 0
    assert info["runtime"]["device"] == "cpu" and info["runtime"]["attention_backend"] == "native"
    assert {"torch", "diffusers", "bentoml"} <= set(info["versions"])


def test_mp4_encoding_is_deterministic(engine):
    from media.video import encode_mp4, read_video

    video = engine.generate([spec(seed=3, height=64, width=64, num_frames=17)]).videos[0]
    encoded = {encode_mp4(video, 16) for _ in range(8)}
    assert len(encoded) == 1
    frames, fps = read_video(encoded.pop())
    assert frames.shape == video.shape and fps == 16
    assert psnr(frames, video) > 28  # noise-like random-model frames are the worst case for H.264
