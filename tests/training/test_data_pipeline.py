"""End-to-end data pipeline on generated videos with planted cuts, a static shot, a duplicate, a
broken file and an off-topic shot that the VideoMAE classifier must filter out."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import numpy as np
import pytest
from click.testing import CliRunner
from training_test_media import blobs, colour_bars, debug_config

from media.video import read_video, write_mp4
from training.cli import data_group
from training.data.classifier import ClassifierConfig, VideoClassifier, train_classifier
from training.data.pipeline import DataPipelineConfig, build_dataset, motion_score
from training.trainer import train

SIZE = (48, 64)  # raw videos: 64x48 at 24 fps
FAKE_CAPTION = "a time-lapse of fluorescent cells moving"


def _raw_videos(root):
    """Sources with known shots (24 fps, 1.5 s each):

    cellular/a.mp4: dark blobs | bright-background dark blobs | colour bars (off-topic)   -> 3 shots
    b.mp4 (+ b.txt caption): blobs | a frozen frame (static)                             -> 2 shots
    c.mp4 (caption in metadata.json): the first shot of a.mp4 again (near-duplicate)      -> 1 shot
    broken.mp4: not a video
    """
    n = 36
    shot1 = blobs(n, SIZE, seed=1, background=15)
    a = np.concatenate([shot1, blobs(n, SIZE, seed=2, background=200, polarity=-1), colour_bars(n, SIZE, seed=3)])
    write_mp4(root / "cellular" / "a.mp4", a, fps=24)
    still = blobs(1, SIZE, seed=5, background=120, polarity=-1)
    write_mp4(root / "b.mp4", np.concatenate([blobs(n, SIZE, seed=4, background=15), np.repeat(still, n, 0)]), fps=24)
    (root / "b.txt").write_text("bacteria swimming toward source")
    write_mp4(root / "c.mp4", shot1, fps=24)
    (root / "metadata.json").write_text(json.dumps([{"video": "c.mp4", "prompt": "cells dividing"}]))  # upstream format
    (root / "broken.mp4").write_bytes(b"not a video at all" * 50)


def _labelled(root, per_class=12):
    """Labelled folder for the classifier: microscopy-like blobs vs colour bars/stripes."""
    rng = np.random.default_rng(0)
    for i in range(per_class):
        bg, pol = (int(rng.integers(5, 60)), 1) if i % 2 else (int(rng.integers(150, 230)), -1)
        write_mp4(root / "on_topic" / f"{i}.mp4", blobs(9, (32, 32), seed=100 + i, background=bg, polarity=pol), fps=16)
        write_mp4(root / "off_topic" / f"{i}.mp4", colour_bars(9, (32, 32), seed=200 + i), fps=16)


class _FakeVLM(BaseHTTPRequestHandler):
    """Loopback OpenAI-compatible ``/v1/chat/completions`` that records requests."""

    requests: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeVLM.requests.append(body)
        reply = {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": FAKE_CAPTION}}
            ],
        }  # fmt: skip
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_vlm():
    server = HTTPServer(("127.0.0.1", 0), _FakeVLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeVLM.requests = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_motion_score_separates_static_from_moving():
    moving = blobs(9, (32, 32), seed=0)
    assert motion_score(moving) > 0.3
    assert motion_score(np.repeat(moving[:1], 9, 0)) < 0.05


def test_classifier_precision_recall(tmp_path):
    _labelled(tmp_path / "labelled")
    cfg = ClassifierConfig(positive="on_topic", num_frames=8, image_size=32, hidden_size=32, epochs=15)
    metrics = train_classifier(tmp_path / "labelled", tmp_path / "clf", cfg)
    assert metrics["n_test"] == 6 and metrics["n_train"] == 18
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    saved = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    assert saved["precision"] == metrics["precision"]
    clf = VideoClassifier.load(tmp_path / "clf")
    on, off = clf.score([tmp_path / "labelled" / "on_topic" / "0.mp4", tmp_path / "labelled" / "off_topic" / "0.mp4"])
    assert on > 0.5 > off


def test_pipeline_end_to_end(tmp_path, fake_vlm, tiny_model):
    raw, out = tmp_path / "raw", tmp_path / "dataset"
    _raw_videos(raw)
    _labelled(tmp_path / "labelled")
    cli = CliRunner()
    result = cli.invoke(
        data_group,
        ["train-classifier", str(tmp_path / "labelled"), str(tmp_path / "clf"), "--positive", "on_topic",
         "--num-frames", "8", "--image-size", "32", "--epochs", "15"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    args = [
        "--input-dir", str(raw), "--output-dir", str(out), "--workers", "2", "--buckets", "32x32",
        "--max-frames", "9", "--min-frames", "9", "--classifier", str(tmp_path / "clf"),
        "--caption-model", "fake-vlm", "--caption-base-url", fake_vlm,
    ]  # fmt: skip
    result = cli.invoke(data_group, ["build", *args])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shots"] == {"sources": 4, "new": 4, "broken": 1, "shots": 6}
    assert summary["clips"]["kept"] == 6
    assert summary["motion"]["static"] == 1
    assert summary["dedup"]["duplicates"] == 1
    assert summary["classify"]["off_topic"] == 1

    manifest = json.loads((out / "manifest.json").read_text())
    clips = manifest["clips"]
    shots_a = manifest["sources"]["cellular/a.mp4"]["shots"]
    assert [round(s, 2) for s, _ in shots_a] == [0.0, 1.5, 3.0]  # the planted cuts
    assert clips["cellular_a-002"]["dropped"] == "off_topic"  # the colour-bar shot
    assert clips["b-001"]["dropped"] == "static"
    assert "dropped" not in clips["c-000"] and clips["cellular_a-000"]["dropped"] == "duplicate"  # first by id wins

    rows = json.loads((out / "metadata.json").read_text())
    assert len(rows) == 3
    fields = {"id", "video", "prompt", "source", "shot_start", "shot_end", "motion_score", "classifier_score", "level"}
    for row in rows:
        assert fields <= set(row)
        frames, fps = read_video(out / row["video"])
        assert frames.shape == (9, 32, 32, 3) and fps == 16
    by_id = {r["id"]: r for r in rows}
    assert by_id["b-000"]["prompt"] == "bacteria swimming toward source"  # sidecar caption kept
    assert by_id["c-000"]["prompt"] == "cells dividing"  # caption from the source metadata.json kept
    assert by_id["cellular_a-001"]["prompt"] == FAKE_CAPTION and by_id["cellular_a-001"]["level"] == "cellular"
    assert len(_FakeVLM.requests) == 1  # only the uncaptioned kept clip went to the VLM
    assert _FakeVLM.requests[0]["messages"][0]["content"][1]["type"] == "image_url"

    # Resumable: a second run redoes nothing and a new source is picked up incrementally.
    write_mp4(raw / "d.mp4", blobs(36, SIZE, seed=9, background=30), fps=24)
    saved = json.loads((out / "pipeline.json").read_text())
    again = build_dataset(DataPipelineConfig(**{**saved, "buckets": ((32, 32),)}))
    assert again["shots"]["new"] == 1 and again["clips"]["new"] == 1 and again["motion"]["scored"] == 1
    assert len(_FakeVLM.requests) == 2
    assert len(json.loads((out / "metadata.json").read_text())) == 4

    # The trainer reads the result as is (frames/height/width from the metadata pick the bucket).
    cfg = debug_config(tmp_path / "run", tiny_model, out, max_steps=2, checkpoint_every=2, validation_prompts=())
    assert train(cfg) == tmp_path / "run" / "final"
    assert len(list((tmp_path / "run" / "cache").glob("*.safetensors"))) == 4 + 1  # 4 clips + prompts


def test_clips_stage_redoes_work_of_a_killed_run(tmp_path):
    from training.data.pipeline import cut_clips, detect_shots

    shots = np.concatenate([blobs(24, SIZE, seed=1), colour_bars(24, SIZE, seed=2)])
    write_mp4(tmp_path / "raw" / "v.mp4", shots, fps=24)
    cfg = DataPipelineConfig(input_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "out"), workers=1,
                             buckets=((32, 32),), max_frames=9, min_frames=9)  # fmt: skip
    assert detect_shots(cfg)["shots"] == 2
    assert cut_clips(cfg)["new"] == 2
    # A run killed mid-stage leaves a pending record (and maybe no file): the next run cuts it again.
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["clips"]["v-001"] = {"id": "v-001", "pending": True}
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "out" / "clips" / "v-001.mp4").unlink()
    assert cut_clips(cfg) == {"new": 1, "kept": 2}
    assert read_video(tmp_path / "out" / "clips" / "v-001.mp4")[0].shape == (9, 32, 32, 3)
    assert detect_shots(cfg)["new"] == 0
