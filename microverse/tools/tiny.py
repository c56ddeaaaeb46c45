"""Tiny Wan2.1-architecture pipelines built in code, with seeded random weights.

They are the fixtures of the test suite: every component is a real diffusers / transformers class, saved with
``save_pretrained`` and loaded back through the same path as a real checkpoint. The tokenizer, text-encoder
and transformer builders are the demo model's (``training.architecture``), at smaller sizes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from training.architecture import build_text_encoder, build_tokenizer, build_transformer

logger = logging.getLogger(__name__)


@dataclass
class TinyWanConfig:
    """Sizes of a tiny Wan-architecture pipeline."""

    seed: int = 0
    """Seed for every random weight, so the same config always gives the same model."""
    vae_base_dim: int = 8
    """Base channel count of the Wan VAE (real Wan2.1: 96)."""
    z_dim: int = 4
    """Latent channels (real Wan2.1: 16)."""
    text_dim: int = 32
    """Width of the UMT5 text encoder (real: 4096)."""
    text_layers: int = 1
    """Text encoder layers."""
    num_layers: int = 2
    """Transformer blocks (real 1.3B: 30)."""
    num_attention_heads: int = 2
    """Attention heads (real 1.3B: 12)."""
    attention_head_dim: int = 16
    """Head dimension (real: 128)."""
    ffn_dim: int = 64
    """Feed-forward width (real 1.3B: 8960)."""
    freq_dim: int = 32
    """Timestep embedding width (real: 256)."""
    max_sequence_length: int = 32
    """Tokenizer max length used by the pipeline for this model."""
    flow_shift: float = 3.0
    """Scheduler shift."""


def build_tiny_pipeline(cfg: TinyWanConfig | None = None):
    """Build a ``WanPipeline`` with seeded random weights of the sizes in ``cfg``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    cfg = cfg or TinyWanConfig()
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKLWan(
        base_dim=cfg.vae_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim,
    )
    torch.manual_seed(cfg.seed + 1)
    tokenizer = build_tokenizer(cfg.max_sequence_length)
    text_encoder = build_text_encoder(len(tokenizer), cfg.text_dim, cfg.text_layers)
    torch.manual_seed(cfg.seed + 2)
    transformer = build_transformer(cfg.z_dim, cfg.text_dim, cfg.freq_dim, cfg.ffn_dim, cfg.num_layers,
                                    cfg.num_attention_heads, cfg.attention_head_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return pipe


def save_tiny_pipeline(path: str | Path, cfg: TinyWanConfig | None = None) -> Path:
    """Build and ``save_pretrained`` a tiny pipeline into ``path`` with small generation defaults."""
    import json

    from ..loading import DEFAULTS_FILE, ModelDefaults

    cfg = cfg or TinyWanConfig()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(cfg).save_pretrained(path)
    (path / "microverse_tiny.json").write_text(json.dumps(asdict(cfg), indent=2))
    defaults = ModelDefaults(height=64, width=64, num_frames=17, num_inference_steps=10, guidance_scale=5.0,
                             fps=16, max_sequence_length=cfg.max_sequence_length)
    (path / DEFAULTS_FILE).write_text(json.dumps(asdict(defaults), indent=2))
    logger.info("saved tiny Wan pipeline to %s", path)
    return path
