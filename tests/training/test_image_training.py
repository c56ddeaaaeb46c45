"""Image-conditioned training: tiny Wan2.1 I2V and Wan2.2 TI2V models fine-tune on first-frame conditioning (loss
falls over 50 steps) and their LoRA exports load in the service and change its image-conditioned output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from training_test_media import blobs, debug_config

from media.video import write_mp4
from training.trainer import train

PROMPTS = ("cells dividing", "blood flowing in a vessel", "bacteria swimming toward source", "vesicles moving along")


@pytest.fixture(scope="module")
def clips_64(tmp_path_factory) -> Path:
    """Four 9-frame 64x64 clips (the tiny TI2V VAE compresses 16x in space)."""
    root = tmp_path_factory.mktemp("clips64")
    rows = []
    for i, prompt in enumerate(PROMPTS):
        write_mp4(root / f"clip{i}.mp4", blobs(9, (64, 64), seed=10 + i, background=20 + 60 * i), fps=16)
        rows.append({"id": f"clip{i}", "video": f"clip{i}.mp4", "prompt": prompt})
    (root / "metadata.json").write_text(json.dumps(rows))
    return root


def _image_video(folder: Path, image: str, lora: str | None) -> np.ndarray:
    from microverse.config import Settings
    from microverse.engine import DiffusersEngine
    from microverse.schemas import GenerationSpec

    engine = DiffusersEngine.from_settings(Settings(model=str(folder), loras={"run": lora} if lora else {}))
    spec = GenerationSpec(prompt="cells dividing", negative_prompt="", height=64, width=64, num_frames=9,
                          num_inference_steps=3, guidance_scale=5.0, seed=0, fps=8, image=image,
                          lora="run" if lora else None)  # fmt: skip
    return engine.generate([spec]).videos[0]


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-ti2v"])
def test_image_conditioned_lora_trains_and_serves(family, tmp_path, clips_64):
    from PIL import Image

    from microverse.images import fit, store_reference
    from microverse.tools.tiny import TinyWanConfig, save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / family, TinyWanConfig(family=family))
    out = tmp_path / "run"
    cfg = debug_config(out, model, clips_64, max_steps=50, checkpoint_every=50, validation_prompts=(),
                       optim__lr=5e-3, model__lora_rank=8, model__lora_alpha=16, data__caption_dropout=0.0,
                       data__buckets=((9, 64, 64),), validation_loss_every=25)  # fmt: skip
    cfg.data.validation_dataset = str(clips_64)
    assert train(cfg) == out / "final"

    # The training loss at random noise levels is too noisy to read over 50 steps; the loss of the same clips at
    # fixed noise levels and noise (validation_loss_every) is not.
    val = list(csv.DictReader((out / "val_loss.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in val] == [0, 25, 50]
    print(f"{family}: loss at fixed noise levels {float(val[0]['loss']):.4f} -> {float(val[-1]['loss']):.4f}")
    assert float(val[-1]["loss"]) < 0.9 * float(val[0]["loss"])
    assert len((out / "loss.csv").read_text().splitlines()) == 51

    cached = load_file(str(next((out / "cache").glob("*.safetensors"))))
    if family == "wan2.1-i2v":  # mask and first-frame latent beside the latents, plus the CLIP image embedding
        assert cached["condition"].shape[0] == 4 + cached["latents"].shape[0] and "image_embeds" in cached
    else:  # TI2V conditions on the clip's own first latent frame: nothing more is cached
        assert set(cached) == {"latents", "prompt_embeds"}

    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[16:48, 16:48] = (40, 220, 90)
    image = store_reference(fit(Image.fromarray(rgb), 64, 64), tmp_path)
    base = _image_video(model, image, None)
    tuned = _image_video(model, image, str(out / "final"))
    diff = np.abs(tuned.astype(float) - base.astype(float)).max()
    print(f"{family}: max |fine-tuned - base| over the image-conditioned video = {diff:.1f} (of 255)")
    assert diff > 2
