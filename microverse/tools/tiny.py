"""Tiny Wan-architecture pipelines built in code, with seeded random weights: Wan2.1 text-to-video (default),
and the Wan2.2 layouts A14B (two experts, ``boundary_ratio``) and TI2V (``expand_timesteps``, the Wan2.2 VAE with
patchified residual blocks and 16x spatial compression), and the image-to-video layouts Wan2.1 I2V (a small CLIP
vision encoder; the DiT reads noise, the masked first-frame latent and the CLIP embedding) and Wan2.2 I2V-A14B.

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


TINY_FAMILIES = ("wan2.1-t2v", "wan2.2-t2v-a14b", "wan2.2-ti2v", "wan2.1-i2v", "wan2.2-i2v-a14b")
"""Families :func:`build_tiny_pipeline` can build."""
CLIP_WIDTH = 32
"""Width of the tiny CLIP vision encoder of the Wan2.1 I2V layout (real: 1280)."""


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
    family: str = "wan2.1-t2v"
    """Layout (``microverse.families``): one of ``TINY_FAMILIES``."""
    boundary_ratio: float = 0.875
    """A14B layouts: fraction of the timesteps (from the noisy end) the high-noise expert denoises."""


def build_tiny_pipeline(cfg: TinyWanConfig | None = None):
    """Build the pipeline of ``cfg.family`` with seeded random weights of the sizes in ``cfg``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    cfg = cfg or TinyWanConfig()
    if cfg.family not in TINY_FAMILIES:
        raise ValueError(f"no tiny layout for family {cfg.family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(cfg.seed)
    wan22_vae = {"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2,
                 "scale_factor_spatial": 16, "decoder_base_dim": cfg.vae_base_dim}  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=cfg.vae_base_dim,
        z_dim=cfg.z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim,
        **(wan22_vae if cfg.family == "wan2.2-ti2v" else {}),
    )
    torch.manual_seed(cfg.seed + 1)
    tokenizer = build_tokenizer(cfg.max_sequence_length)
    text_encoder = build_text_encoder(len(tokenizer), cfg.text_dim, cfg.text_layers)

    i2v = cfg.family in ("wan2.1-i2v", "wan2.2-i2v-a14b")
    image_dim = CLIP_WIDTH if cfg.family == "wan2.1-i2v" else None

    def transformer():
        return build_transformer(cfg.z_dim, cfg.text_dim, cfg.freq_dim, cfg.ffn_dim, cfg.num_layers,
                                 cfg.num_attention_heads, cfg.attention_head_dim,
                                 in_channels=2 * cfg.z_dim + 4 if i2v else None, image_dim=image_dim)  # fmt: skip

    torch.manual_seed(cfg.seed + 2)
    parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer(),
             "scheduler": FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)}  # fmt: skip
    if cfg.family in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        torch.manual_seed(cfg.seed + 3)
        parts.update(transformer_2=transformer(), boundary_ratio=cfg.boundary_ratio)
    elif cfg.family == "wan2.2-ti2v":
        parts.update(expand_timesteps=True)
    if not i2v:
        return WanPipeline(**parts)
    from diffusers import WanImageToVideoPipeline

    if image_dim:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(cfg.seed + 4)
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8))  # fmt: skip
        parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return WanImageToVideoPipeline(**parts)


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
