"""The small-VAE trainer: reconstruction improves on simulator clips and the VAE loads with its stats."""

import json

from click.testing import CliRunner

from simulator.dataset import write_dataset
from training.cli import train_group


def test_vae_training_improves_reconstruction_and_saves_latent_stats(tmp_path):
    from diffusers import AutoencoderKLWan

    write_dataset(tmp_path / "sim", 8, size=32, frames=9, seed=0)
    result = CliRunner().invoke(train_group, ["vae", "--data", str(tmp_path / "sim"), "--out", str(tmp_path / "vae"),
                                              "--size", "32", "--frames", "9", "--steps", "120", "--batch-size", "2",
                                              "--base-dim", "8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "vae" / "metrics.json").read_text())
    assert metrics["clips"] == 8
    assert metrics["loss_last"] < 0.3 * metrics["loss_first"]
    assert metrics["psnr_end"] > metrics["psnr_start"] + 10
    vae = AutoencoderKLWan.from_pretrained(tmp_path / "vae")
    assert len(vae.config.latents_mean) == 4 and min(vae.config.latents_std) > 0
    assert any(abs(m) > 0 for m in vae.config.latents_mean)


def test_small_vae_layout_and_crops():
    import torch

    from training.vae import VAETrainConfig, build_vae, random_crops

    cfg = VAETrainConfig(z_dim=8, spatial_downsamples=2, temporal_downsamples=1, crop_size=16)
    vae = build_vae(cfg)
    # The pipeline reads its latent geometry from these, so they must match the layers.
    assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (4, 2)
    z = vae.encode(torch.zeros(1, 3, 17, 32, 32)).latent_dist.mode()
    assert z.shape == (1, 8, 9, 8, 8)
    clips = torch.randn(3, 3, 17, 32, 32)
    crops = random_crops(clips, torch.tensor([0, 2]), cfg, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 17, 16, 16)  # never cut in time
    assert torch.equal(random_crops(clips, torch.tensor([1]), VAETrainConfig(), torch.Generator())[0], clips[1])


def test_foreground_weight_puts_small_objects_first():
    import torch

    from training.vae import reconstruction_loss

    target = -torch.ones(1, 3, 1, 8, 8)
    target[..., 3, 3] = 1.0  # one bright pixel on a dark background
    background_only = -torch.ones_like(target)
    blurred_object = target.clone()
    blurred_object[..., 3, 3] = 0.0
    blurred_object[..., 0, :] = -0.5  # background errors spread over 8 pixels instead
    assert reconstruction_loss(background_only, target) < reconstruction_loss(blurred_object, target)
    assert reconstruction_loss(background_only, target, 10.0) > reconstruction_loss(blurred_object, target, 10.0)
    assert reconstruction_loss(target, target, 10.0) == 0


def test_crop_candidates_prefer_windows_with_objects():
    import torch

    from training.vae import VAETrainConfig, random_crops

    clips = -torch.ones(1, 3, 5, 64, 64)
    clips[..., 50:54, 50:54] = 1.0  # one small object in a corner
    gen = torch.Generator().manual_seed(0)
    uniform = random_crops(clips.expand(64, -1, -1, -1, -1), torch.arange(64), VAETrainConfig(crop_size=16), gen)
    chosen = random_crops(clips.expand(64, -1, -1, -1, -1), torch.arange(64),
                          VAETrainConfig(crop_size=16, crop_candidates=8), gen)
    with_object = lambda crops: int((crops.amax(dim=(1, 2, 3, 4)) > 0).sum())  # noqa: E731
    assert with_object(chosen) > 2 * with_object(uniform)
