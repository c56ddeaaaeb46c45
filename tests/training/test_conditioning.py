"""Image conditioning for training: the denoiser inputs built from cached conditions equal what diffusers'
``WanImageToVideoPipeline`` feeds its transformer, for every image-conditioned tiny Wan family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.conditioning import (
    conditioning_kind,
    encode_condition,
    first_frame_image,
    image_pipeline,
    model_inputs,
)
from training.dataset import encode_latents
from training.objective import FlowMatchObjective, masked_mse

FRAMES, SIZE = 9, 64
KINDS = {"wan2.1-t2v": "none", "wan2.2-t2v-a14b": "none", "wan2.1-i2v": "channels",
         "wan2.2-i2v-a14b": "channels", "wan2.2-ti2v": "first_frame"}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from microverse.tools.tiny import TinyWanConfig, save_tiny_pipeline

    root = tmp_path_factory.mktemp("cond-models")
    return {family: save_tiny_pipeline(root / family, TinyWanConfig(family=family)) for family in KINDS}


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """A ``[3, F, H, W]`` clip in [-1, 1] from uint8 pixels, as ``training.dataset.load_clip`` gives."""
    pixels = torch.randint(0, 256, (3, FRAMES, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    return pixels.float() / 127.5 - 1.0


def test_conditioning_kind_of_every_family(models):
    assert {family: conditioning_kind(path) for family, path in models.items()} == KINDS


def test_ti2v_saved_as_image_pipeline_is_first_frame(tmp_path):
    from diffusers import WanImageToVideoPipeline

    from microverse.tools.tiny import TinyWanConfig, build_tiny_pipeline

    pipe = WanImageToVideoPipeline.from_pipe(build_tiny_pipeline(TinyWanConfig(family="wan2.2-ti2v")))
    pipe.save_pretrained(tmp_path / "saved")
    assert conditioning_kind(tmp_path / "saved") == "first_frame"
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    del index["expand_timesteps"]  # the layout microverse.families also reads as TI2V
    (tmp_path / "saved" / "model_index.json").write_text(json.dumps(index))
    assert conditioning_kind(tmp_path / "saved") == "first_frame"
    assert image_pipeline(tmp_path / "saved").config.expand_timesteps


def test_text_to_video_takes_no_condition(models, clip):
    with pytest.raises(ValueError, match="text-to-video"):
        image_pipeline(models["wan2.1-t2v"])
    x_t, sigmas = torch.randn(2, 4, 3, 8, 8), torch.tensor([0.5, 0.25])
    hidden, timestep, extra, mask = model_inputs("none", x_t, x_t, sigmas, {})
    assert hidden is x_t and torch.equal(timestep, torch.tensor([500.0, 250.0])) and extra == {} and mask is None


def _pipeline_transformer_inputs(folder: Path, clip: torch.Tensor, noise: torch.Tensor) -> dict:
    """The kwargs diffusers' ``WanImageToVideoPipeline`` passes its transformer on the first step, run from the
    clip's first frame with ``noise`` as starting latents."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(str(folder))
    seen = {}
    pipe.transformer.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    pipe(image=first_frame_image(clip), prompt="cells", height=SIZE, width=SIZE, num_frames=FRAMES,
         num_inference_steps=1, guidance_scale=1.0, latents=noise, output_type="latent")  # fmt: skip
    assert pipe.scheduler.sigmas[0] == 1.0  # the first step denoises from pure noise: x_t = noise at sigma 1
    return seen


def _check_extras(family: str, cond: dict, extra: dict, seen: dict) -> None:
    """Only Wan2.1 I2V has a CLIP image encoder: its cached embedding is what the pipeline passes."""
    if family != "wan2.1-i2v":
        assert extra == {} and seen["encoder_hidden_states_image"] is None and "image_embeds" not in cond
        return
    assert set(cond) == {"condition", "image_embeds"} and cond["image_embeds"].dim() == 2
    assert torch.equal(extra["encoder_hidden_states_image"], seen["encoder_hidden_states_image"])


@pytest.mark.parametrize("family", ["wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v"])
def test_model_inputs_match_diffusers_pipeline(models, clip, family):
    kind = KINDS[family]
    cond_pipe = image_pipeline(models[family])
    assert cond_pipe.transformer is None and cond_pipe.text_encoder is None
    cond = encode_condition(cond_pipe, kind, clip)
    x0 = encode_latents(cond_pipe.vae, clip[None])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.ones(1)
    x_t = FlowMatchObjective.noisy_input(x0, noise, sigmas)
    batched = {name: value[None] for name, value in cond.items()}
    hidden, timestep, extra, _ = model_inputs(kind, x_t, x0, sigmas, batched)

    seen = _pipeline_transformer_inputs(models[family], clip, noise)
    assert torch.equal(hidden, seen["hidden_states"])  # same VAE calls on the same pixels: bit-exact
    assert torch.equal(timestep, seen["timestep"].float())
    _check_extras(family, cond, extra, seen)
    if kind == "channels":
        assert cond["condition"].shape == (4 + x0.shape[1], *x0.shape[2:])
    else:
        assert cond == {} and timestep.shape == (1, seen["hidden_states"][0, 0].numel() // 4)


def test_first_latent_frame_is_the_first_frame_alone(models, clip):
    """The causal Wan2.2 VAE: the clip's first latent frame is the encoding of its first frame alone, the
    condition TI2V inference uses, so ``first_frame`` caches nothing beyond the clip's latents."""
    pipe = image_pipeline(models["wan2.2-ti2v"])
    whole = encode_latents(pipe.vae, clip[None])
    alone = encode_latents(pipe.vae, clip[None, :, :1])
    assert alone.shape[2] == 1 and whole.shape[2] == 3
    torch.testing.assert_close(whole[:, :, :1], alone, rtol=0, atol=1e-6)


def test_first_frame_timesteps_and_loss_mask():
    x0, x_t = torch.randn(2, 4, 3, 4, 6), torch.randn(2, 4, 3, 4, 6)
    sigmas = torch.tensor([0.8, 0.3])
    hidden, timestep, extra, mask = model_inputs("first_frame", x_t, x0, sigmas, {})
    assert torch.equal(hidden[:, :, 0], x0[:, :, 0]) and torch.equal(hidden[:, :, 1:], x_t[:, :, 1:])
    per_frame = 2 * 3  # (4 / 2) * (6 / 2) tokens per latent frame
    assert timestep.shape == (2, 3 * per_frame) and extra == {}
    assert torch.equal(timestep[:, :per_frame], torch.zeros(2, per_frame))
    torch.testing.assert_close(timestep[:, per_frame:], (1000 * sigmas)[:, None].expand(2, 2 * per_frame))
    assert mask.shape == (2, 1, 3, 1, 1) and mask.flatten(1).tolist() == [[0, 1, 1], [0, 1, 1]]
    pred, target = torch.randn_like(x0), torch.randn_like(x0)
    torch.testing.assert_close(masked_mse(pred, target, mask), ((pred - target) ** 2)[:, :, 1:].flatten(1).mean(1))
    torch.testing.assert_close(masked_mse(pred, target, None), ((pred - target) ** 2).flatten(1).mean(1))


def test_unknown_kind_is_refused(clip):
    with pytest.raises(ValueError, match="unknown conditioning kind"):
        model_inputs("depth", torch.zeros(1, 4, 1, 2, 2), torch.zeros(1, 4, 1, 2, 2), torch.ones(1), {})
    with pytest.raises(ValueError, match="unknown conditioning kind"):
        encode_condition(None, "depth", clip)
