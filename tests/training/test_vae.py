"""The small-VAE trainer: reconstruction improves on simulator clips and the VAE loads with its stats."""

import json

from click.testing import CliRunner

from training.cli import train_group
from training.simulator import write_dataset


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
