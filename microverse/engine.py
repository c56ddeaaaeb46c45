"""The engine: owns the diffusers pipeline and runs one batch of compatible requests per call.

:class:`VideoEngine` is the small interface the server depends on; tests may swap in their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .config import Settings
from .images import open_reference
from .loading import LoadedModel, activate, load_pipeline
from .optimize import RuntimeChoice, apply_optimizations, quantization_config, resolve_device, resolve_dtype
from .presets import Plan, PresetOptions, PromptEmbeddingCache, applied, cfg_truncation, make_plan
from .schemas import GenerationSpec

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, total steps)."""


class GenerationCancelled(Exception):
    """Every request of the batch was cancelled; raised between steps."""


@dataclass
class BatchResult:
    """Frames for each request of a batch, in order, plus timings."""

    videos: list[np.ndarray]
    """uint8 arrays (frames, height, width, 3)."""
    denoise_seconds: float
    """Time spent in text encoding and denoising."""
    decode_seconds: float
    """Time spent in VAE decode and conversion to uint8."""
    latents: torch.Tensor | None = None
    """Final latents (B, C, T, H, W) before decode."""
    plan: Plan | None = None
    """What the preset ran (steps, CFG steps, step cache)."""


class VideoEngine(Protocol):
    """What the server needs from an engine."""

    model: LoadedModel
    choice: RuntimeChoice

    def generate(
        self, specs: list[GenerationSpec], on_step: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> BatchResult: ...


class DiffusersEngine:
    """Runs ``WanPipeline`` once per batch: list prompts, one generator per request."""

    def __init__(self, model: LoadedModel, choice: RuntimeChoice, options: PresetOptions | None = None):
        self.model = model
        self.choice = choice
        self.options = options or PresetOptions()
        self.prompt_cache = PromptEmbeddingCache(self.options.prompt_cache_size)
        self._lock = threading.Lock()
        self._active: tuple[str | None, float] = (None, 1.0)
        self.adapter_switches = 0
        """Times a batch needed other adapters than the one before."""
        self.adapter_switch_seconds = 0.0
        """Total time those switches took (``set_adapters``: the weights stay loaded)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> DiffusersEngine:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        model = load_pipeline(settings, torch_dtype=dtype, quantization_config=quantization_config(settings, device))
        choice = apply_optimizations(model.pipe, settings, device, dtype)
        model.pipe.set_progress_bar_config(disable=True)
        logger.info("engine ready: %s on %s (%s)", model.name, device, dtype)
        return cls(model, choice, PresetOptions.from_settings(settings))

    def generate(
        self, specs: list[GenerationSpec], on_step: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> BatchResult:
        """Generate one video per spec. All specs must share ``batch_key``."""
        if not specs:
            return BatchResult([], 0.0, 0.0)
        keys = {s.batch_key for s in specs}
        if len(keys) != 1:
            raise ValueError(f"incompatible specs in one batch: {keys}")
        first = specs[0]
        plan = make_plan(first.preset or self.options.preset, first.num_inference_steps, first.guidance_scale,
                         self.options, first.scheduler, first.flow_shift)
        total = plan.num_inference_steps

        def callback(pipe, i, t, kwargs):
            cfg_truncation(pipe, plan, i)
            if on_step is not None:
                on_step(i + 1, total)
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled()
            return kwargs

        generators = [torch.Generator(device="cpu").manual_seed(s.seed) for s in specs]
        pipe = self.model.image_pipe if first.image is not None else self.model.pipe
        image = {"image": open_reference(first.image)} if first.image is not None else {}
        max_len = self.model.defaults.max_sequence_length
        with self._lock, torch.inference_mode():
            self._use_adapter(first.lora, first.lora_scale)
            t0 = time.perf_counter()
            prompt_embeds = self.prompt_cache.embed(pipe, [s.prompt for s in specs], max_len)
            negative_embeds = (self.prompt_cache.embed(pipe, [first.negative_prompt] * len(specs), max_len)
                               if first.guidance_scale > 1 else None)
            with applied(pipe, plan):
                latents = pipe(
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_embeds,
                    height=first.height,
                    width=first.width,
                    num_frames=first.num_frames,
                    num_inference_steps=total,
                    guidance_scale=first.guidance_scale,
                    generator=generators,
                    max_sequence_length=max_len,
                    output_type="latent",
                    callback_on_step_end=callback,
                    **image,
                ).frames
            t1 = time.perf_counter()
            videos = self.decode(latents)
            t2 = time.perf_counter()
        return BatchResult(videos, t1 - t0, t2 - t1, latents=latents, plan=plan)

    def _use_adapter(self, adapter: str | None, scale: float) -> None:
        """Activate the batch's adapter when it differs from the previous batch's (timed)."""
        if (adapter, scale) == self._active:
            return
        t0 = time.perf_counter()
        activate(self.model.pipe, self.model, adapter, scale)
        took = time.perf_counter() - t0
        self._active = (adapter, scale)
        self.adapter_switches += 1
        self.adapter_switch_seconds += took
        logger.info("adapter %s at %g active (switch %.1f ms)", adapter or "none", scale, 1000 * took)

    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """VAE-decode Wan latents to uint8 frame arrays (T, H, W, 3)."""
        vae = self.model.pipe.vae
        latents = latents.to(vae.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]  # (B, C, T, H, W) in [-1, 1]
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [v.permute(1, 2, 3, 0).contiguous().cpu().numpy() for v in video]
