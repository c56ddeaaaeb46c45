"""Image conditioning for training image-conditioned Wan models the way diffusers' ``WanImageToVideoPipeline``
runs them, conditioned on the clip's first frame.

Three kinds, told apart by the checkpoint's ``model_index.json``:

- ``none``: text-to-video (Wan2.1 T2V, Wan2.2 T2V-A14B); the denoiser reads ``x_t`` alone.
- ``channels``: Wan2.1 I2V and Wan2.2 I2V-A14B; the denoiser reads ``cat([x_t, condition], dim=1)`` where
  ``condition`` is a 4-channel first-frame mask and the normalised latent of ``[image, zeros...]``, plus (Wan2.1
  I2V) the CLIP embedding of the image as ``encoder_hidden_states_image``.
- ``first_frame``: Wan2.2 TI2V (``expand_timesteps``); the first latent frame is the clean latent of the image,
  its tokens get timestep 0 and it is left out of the loss. The Wan VAE is causal, so the first latent frame of
  the whole clip equals the latent of its first frame alone: the clip's own latents are all that is cached.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.objective import NUM_TRAIN_TIMESTEPS

logger = logging.getLogger(__name__)

KINDS = ("none", "channels", "first_frame")
"""Conditioning kinds, see the module docstring."""


def _has(index: dict[str, Any], component: str) -> bool:
    """Whether ``model_index.json`` names a (non-null) ``component``."""
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def kind_of_index(index: dict[str, Any]) -> str:
    """The conditioning kind of a ``model_index.json`` (the rules of ``microverse.families.detect_family``)."""
    cls = index.get("_class_name")
    if cls not in ("WanPipeline", "WanImageToVideoPipeline"):
        raise ValueError(f"model_index.json names pipeline {cls!r}, not a Wan pipeline")
    if index.get("expand_timesteps"):
        return "first_frame"
    if cls == "WanPipeline":
        return "none"
    return "channels" if _has(index, "image_encoder") or _has(index, "transformer_2") else "first_frame"


def conditioning_kind(pretrained: str | Path) -> str:
    """The conditioning kind of a local checkpoint folder or Hugging Face id."""
    from diffusers import DiffusionPipeline

    return kind_of_index(dict(DiffusionPipeline.load_config(str(pretrained))))


def image_pipeline(pretrained: str | Path, **kwargs):
    """A ``WanImageToVideoPipeline`` for caching conditions: no transformers and (unless passed in ``kwargs``, e.g.
    to share loaded components) no text encoder. Loads TI2V checkpoints saved as ``WanPipeline`` as well."""
    kind = conditioning_kind(pretrained)
    if kind == "none":
        raise ValueError(f"{pretrained} is a text-to-video checkpoint; it takes no image condition")
    from diffusers import WanImageToVideoPipeline

    options = {"transformer": None, "transformer_2": None, "text_encoder": None, "tokenizer": None,
               "expand_timesteps": kind == "first_frame", **kwargs}  # fmt: skip
    return WanImageToVideoPipeline.from_pretrained(str(pretrained), **options)


def first_frame_image(clip: torch.Tensor) -> Image.Image:
    """The first frame of a ``[3, F, H, W]`` clip in [-1, 1] as the RGB image a user would pass the pipeline."""
    pixels = ((clip[:, 0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def encode_condition(pipe, kind: str, clip: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample tensors to cache beside the latents of a ``[3, F, H, W]`` clip in [-1, 1], computed with the
    pipeline's own ``prepare_latents`` and ``encode_image``: ``condition`` ``[4 + z, F', H', W']`` and, with an
    image encoder, ``image_embeds`` ``[tokens, dim]`` for ``channels``; nothing for ``none`` and ``first_frame``."""
    if kind not in KINDS:
        raise ValueError(f"unknown conditioning kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind != "channels":
        return {}
    _, frames, height, width = clip.shape
    device = pipe.vae.device
    image = first_frame_image(clip)
    pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
    generator = torch.Generator(device).manual_seed(0)  # only draws the unused starting noise
    _, condition = pipe.prepare_latents(
        pixels, 1, pipe.vae.config.z_dim, height, width, frames, torch.float32, device, generator
    )
    out = {"condition": condition[0].float().cpu()}
    if getattr(pipe, "image_encoder", None) is not None:
        out["image_embeds"] = pipe.encode_image(image, device)[0].float().cpu()
    return out


def _first_frame_inputs(
    x_t: torch.Tensor, x0: torch.Tensor, timestep: torch.Tensor, patch_size: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """TI2V inputs: clean first latent frame, per-token timesteps that are 0 on it, a loss mask without it."""
    batch, _, frames, height, width = x_t.shape
    hidden = torch.cat([x0[:, :, :1].to(x_t), x_t[:, :, 1:]], dim=2)
    pt, ph, pw = patch_size
    tokens = torch.ones(frames // pt, (height // ph) * (width // pw), device=x_t.device)
    tokens[0] = 0
    per_token = timestep.view(-1, 1).to(tokens) * tokens.flatten()
    mask = torch.ones(batch, 1, frames, 1, 1, device=x_t.device)
    mask[:, :, 0] = 0
    return hidden, per_token, {}, mask


def model_inputs(
    kind: str,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    cond: dict[str, torch.Tensor],
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Denoiser ``hidden_states``, ``timestep``, extra transformer kwargs and loss mask (None: every element) for a
    batch of noisy latents ``x_t`` of clean latents ``x0`` at ``sigmas``, with the batched cached ``cond``."""
    timestep = NUM_TRAIN_TIMESTEPS * sigmas
    if kind == "none":
        return x_t, timestep, {}, None
    if kind == "channels":
        hidden = torch.cat([x_t, cond["condition"].to(x_t)], dim=1)
        extra = {"encoder_hidden_states_image": cond["image_embeds"].to(x_t)} if "image_embeds" in cond else {}
        return hidden, timestep, extra, None
    if kind == "first_frame":
        return _first_frame_inputs(x_t, x0, timestep, patch_size)
    raise ValueError(f"unknown conditioning kind {kind!r}; choose one of {', '.join(KINDS)}")

