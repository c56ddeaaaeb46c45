"""Fixtures for the training tests: synthetic videos, a tiny Wan pipeline and a tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_test_media import blobs, debug_config

from media.video import write_mp4
from training.trainer import train

PROMPTS = (
    "cells dividing",
    "blood flowing in a vessel",
    "bacteria swimming toward source",
    "vesicles moving along microtubule",
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from microverse.tools.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Four 32x32x9 clips at 16 fps with upstream-format ``metadata.json`` (``id``, ``video``, ``prompt``)."""
    root = tmp_path_factory.mktemp("dataset")
    rows = []
    for i, prompt in enumerate(PROMPTS):
        write_mp4(root / "videos" / f"clip{i}.mp4", blobs(9, (32, 32), seed=i, background=20 + 60 * i), fps=16)
        rows.append({"id": f"clip{i}", "video": f"videos/clip{i}.mp4", "prompt": prompt})
    (root / "metadata.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("lora")
    cfg = debug_config(
        out, tiny_model, tiny_dataset, max_steps=200, checkpoint_every=100, validation_every=100,
        optim__lr=5e-3, model__lora_rank=8, model__lora_alpha=16, write_upstream=True,
    )  # fmt: skip
    assert train(cfg) == out / "final"
    return out


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("full")
    cfg = debug_config(out, tiny_model, tiny_dataset, mode="full", max_steps=200, checkpoint_every=100,
                       validation_prompts=(), write_upstream=True)
    train(cfg)
    return out
