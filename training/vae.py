"""Train a small Wan VAE (``AutoencoderKLWan``) on a clip dataset, for models too small to use the
real 500 MB Wan2.1 VAE (the embedded demo model). Reconstruction (L1) + a small KL term; the saved
VAE carries per-channel ``latents_mean`` / ``latents_std`` measured on the data, so the pipeline and
the DiT trainer normalise its latents the way Wan does.

    microverse train vae --data data/sim --out outputs/demo-vae --steps 3000
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from media.video import read_video, resize_crop

from .dataset import read_metadata

logger = logging.getLogger(__name__)


@dataclass
class VAETrainConfig:
    """What the VAE trainer does."""

    data: str = "data/sim"
    """Dataset folder with ``metadata.json`` (upstream format) and its clips."""
    out: str = "outputs/demo-vae"
    """Where the trained VAE is saved (``save_pretrained``)."""
    size: int = 64
    """Clips are resized and centre-cropped to size x size."""
    frames: int = 17
    """Frames per clip (4k+1)."""
    crop_size: int | None = None
    """Train on random crop_size x crop_size windows (the VAE is convolutional; far cheaper). None: whole
    frames. Clips are never cut in time: the causal VAE's reconstruction degrades on frames beyond the
    length it trained on."""
    crop_candidates: int = 1
    """Random windows drawn per crop; the one with the most foreground is used (1: uniform crops). Small
    objects fill few windows, so uniform crops mostly teach the background."""
    base_dim: int = 16
    """Base channel count of the VAE."""
    z_dim: int = 4
    """Latent channels."""
    spatial_downsamples: int = 3
    """Spatial 2x downsamplings (3: 8x like Wan2.1; 2: 4x, for small frames)."""
    temporal_downsamples: int = 2
    """Of those, how many also halve time (Wan2.1: 2, i.e. 4x)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 4
    """Clips per step."""
    lr: float = 3e-4
    """AdamW learning rate (cosine decay to 10 % over the steps)."""
    kl_weight: float = 1e-6
    """Weight of the KL term against the L1 reconstruction."""
    foreground_weight: float = 0.0
    """Extra L1 weight per unit of a pixel's distance from its clip's median colour (0: plain L1). Small
    objects on a flat background (cells, particles) are a few percent of the pixels; without it the
    VAE first learns to reproduce the background alone."""
    stats_clips: int = 256
    """Clips (evenly spaced) encoded to measure ``latents_mean``/``latents_std``."""
    seed: int = 0
    """Seed of the initial weights and the clip order."""


def load_clips(cfg: VAETrainConfig) -> torch.Tensor:
    """All clips as one ``[N, 3, F, H, W]`` float tensor in [-1, 1]."""
    root = Path(cfg.data)
    clips = []
    for entry in tqdm(read_metadata(root), desc="loading clips", unit="clip"):
        video, _ = read_video(root / entry["video"])
        if len(video) < cfg.frames:
            logger.warning("skipping %s: %d frames < %d", entry["video"], len(video), cfg.frames)
            continue
        video = resize_crop(video[: cfg.frames], cfg.size, cfg.size)
        clips.append(torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2))
    if not clips:
        raise ValueError(f"no usable clips in {root}")
    return torch.stack(clips).float() / 127.5 - 1.0


def build_vae(cfg: VAETrainConfig):
    from diffusers import AutoencoderKLWan

    n, nt = cfg.spatial_downsamples, cfg.temporal_downsamples
    if not 0 <= nt <= n:
        raise ValueError(f"temporal_downsamples must be between 0 and spatial_downsamples ({n}), got {nt}")
    torch.manual_seed(cfg.seed)
    return AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=[1] + [2] * n, num_res_blocks=1,
                            temperal_downsample=[False] * (n - nt) + [True] * nt, latents_mean=[0.0] * cfg.z_dim,
                            latents_std=[1.0] * cfg.z_dim, scale_factor_spatial=2**n, scale_factor_temporal=2**nt)


def random_crops(clips: torch.Tensor, index: torch.Tensor, cfg: VAETrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Clips ``index`` cut to ``crop_size``² windows (whole frames when unset): of ``crop_candidates``
    random windows, the one holding the most foreground (distance from the clip's median colour)."""
    if cfg.crop_size is None:
        return clips[index]
    cs, h, w = cfg.crop_size, clips.shape[-2], clips.shape[-1]
    out = []
    for i in index.tolist():
        clip = clips[i]
        fg = (clip - clip.flatten(1).median(dim=1).values[:, None, None, None]).abs().sum(dim=(0, 1))
        windows = torch.stack([torch.randint(h - cs + 1, (cfg.crop_candidates,), generator=gen),
                               torch.randint(w - cs + 1, (cfg.crop_candidates,), generator=gen)], dim=1)
        y0, x0 = max(windows.tolist(), key=lambda yx: float(fg[yx[0] : yx[0] + cs, yx[1] : yx[1] + cs].sum()))
        out.append(clip[:, :, y0 : y0 + cs, x0 : x0 + cs])
    return torch.stack(out)


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, foreground_weight: float = 0.0) -> torch.Tensor:
    """L1, each pixel weighted by ``1 + foreground_weight * |target - clip median|`` (mean over channels)."""
    l1 = (recon - target).abs()
    if not foreground_weight:
        return l1.mean()
    background = target.flatten(2).median(dim=2).values[..., None, None, None]
    weight = 1 + foreground_weight * (target - background).abs().mean(dim=1, keepdim=True)
    return (l1 * weight).sum() / (weight.sum() * l1.shape[1])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1]."""
    mse = torch.mean(((a.clamp(-1, 1) - b) / 2) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def train_vae(cfg: VAETrainConfig) -> dict:
    """Train, measure latent statistics, save; returns the metrics (also written to ``metrics.json``)."""
    clips = load_clips(cfg)
    vae = build_vae(cfg)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = clips[: min(8, len(clips))]
    with torch.no_grad():
        start_psnr = psnr(vae(probe).sample, probe)
    losses = []
    progress = tqdm(range(cfg.steps), desc="training VAE", unit="step")
    for _ in progress:
        batch = random_crops(clips, torch.randint(len(clips), (cfg.batch_size,), generator=gen), cfg, gen)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = reconstruction_loss(recon, batch, cfg.foreground_weight) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    vae.eval()
    with torch.no_grad():
        end_psnr = psnr(vae(probe, sample_posterior=False).sample, probe)
        sample = clips[torch.linspace(0, len(clips) - 1, min(len(clips), cfg.stats_clips)).long()]
        mus = torch.cat([vae.encode(sample[i : i + 8]).latent_dist.mode() for i in range(0, len(sample), 8)])
    mean = mus.mean(dim=(0, 2, 3, 4))
    std = mus.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    out = Path(cfg.out)
    vae.save_pretrained(out)
    n = max(1, len(losses) // 10)
    metrics = {"clips": len(clips), "steps": cfg.steps, "loss_first": float(np.mean(losses[:n])),
               "loss_last": float(np.mean(losses[-n:])), "psnr_start": start_psnr, "psnr_end": end_psnr,
               "parameters": sum(p.numel() for p in vae.parameters()), "config": asdict(cfg)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "loss.csv").write_text("step,loss\n" + "".join(f"{i + 1},{v:.6g}\n" for i, v in enumerate(losses)))
    logger.info("VAE saved to %s: PSNR %.1f -> %.1f dB", out, start_psnr, end_psnr)
    return metrics
