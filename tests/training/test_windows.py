"""Frame windows (issue 21, item 4): several training samples from one long recording."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from training_test_media import blobs

from media.video import write_mp4
from training.dataset import build_samples, load_clip, window_starts


@pytest.mark.parametrize(("mode", "kw", "starts"), [
    ("head", {}, [0]),
    ("chunk", {}, [0, 9, 18, 27]),
    ("chunk", {"most": 2}, [0, 9]),
    ("slide", {"stride": 8}, [0, 8, 16, 24]),
    ("slide", {"most": 10}, [0, 4, 8, 12, 16, 20, 24, 28, 32]),
    ("uniform", {"most": 3}, [0, 16, 32]),
])  # fmt: skip
def test_window_starts(mode, kw, starts):
    assert window_starts(41, 9, mode, **kw) == starts
    assert all(s >= 0 and s + 9 <= 41 for s in starts)


def test_short_and_exact_clips_and_a_bad_mode():
    assert window_starts(8, 9, "chunk") == [] and window_starts(9, 9, "uniform") == [0]
    with pytest.raises(ValueError, match=r"data\.frame_windows"):
        window_starts(41, 9, "random")


@pytest.fixture
def long_clip(tmp_path):
    write_mp4(tmp_path / "videos" / "long.mp4", blobs(41, (32, 32), seed=3, speed=3.0), fps=16)
    (tmp_path / "metadata.json").write_text(json.dumps([{"id": "long", "video": "videos/long.mp4",
                                                         "prompt": "cells drifting"}]))  # fmt: skip
    return tmp_path


def test_a_long_clip_gives_several_distinct_samples(long_clip, tmp_path):
    cache = tmp_path / "cache"
    samples = build_samples(long_clip, ((9, 32, 32),), cache, "key", 32, windows="chunk")
    assert [s.start for s in samples] == [0, 9, 18, 27]
    assert [s.id for s in samples] == ["long#0", "long#9", "long#18", "long#27"]
    assert len({s.cache_file for s in samples}) == 4
    clips = [load_clip(s) for s in samples]
    assert all(c.shape == (3, 9, 32, 32) for c in clips)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (clips[i] - clips[j]).abs().mean() > 0.01, (i, j)


def test_head_keeps_the_cache_names_of_earlier_runs(long_clip, tmp_path):
    """The default (``head``) names its cache files as before windows existed, so existing caches stay valid."""
    (sample,) = build_samples(long_clip, ((9, 32, 32),), tmp_path / "cache", "key", 32)
    video = (long_clip / "videos" / "long.mp4").resolve()
    key = json.dumps([str(video), video.stat().st_mtime_ns, "cells drifting", (9, 32, 32), "key", 32])
    assert sample.id == "long" and sample.start == 0
    assert sample.cache_file.name == hashlib.sha1(key.encode()).hexdigest()[:16] + ".safetensors"
    assert torch.equal(load_clip(sample), load_clip(build_samples(long_clip, ((9, 32, 32),), tmp_path / "c", "key", 32,
                                                                  windows="chunk")[0]))


def test_training_caches_and_trains_on_every_window(long_clip, tmp_path, tiny_model):
    from training_test_media import debug_config

    from training.trainer import Trainer

    cfg = debug_config(tmp_path / "run", tiny_model, long_clip, max_steps=2, data__frame_windows="slide",
                       data__window_stride=16, data__buckets=((9, 32, 32),), validation_prompts=())  # fmt: skip
    trainer = Trainer(cfg)
    assert [s.start for s in trainer.samples] == [0, 16, 32]
    assert all(s.cache_file.exists() for s in trainer.samples)
    trainer.train()
    assert trainer.step == 2


def test_buckets_derived_from_the_clips_aspect_ratios():
    from training.dataset import derive_buckets

    sizes = [(81, 480, 832)] * 5 + [(81, 720, 720)] * 3 + [(81, 1080, 1920)] * 2 + [(81, 600, 300)]
    buckets = derive_buckets(sizes, [81, 33], area=480 * 832, most=3)
    # Each aspect at about 480 x 832 pixels in multiples of 16, every frame count; the one portrait clip, the rarest
    # shape, is left out when 3 buckets are kept.
    shapes = [(480, 832), (480, 848), (624, 624)]
    assert buckets == tuple((f, h, w) for f in (33, 81) for h, w in shapes)
    assert all(abs(h * w - 480 * 832) / (480 * 832) < 0.05 for _, h, w in buckets)
    assert (81, 896, 448) in derive_buckets(sizes, [81], area=480 * 832)  # the portrait clip, given room
    assert derive_buckets([(9, 40, 40)], [9], area=32 * 32, multiple=32) == ((9, 32, 32),)
