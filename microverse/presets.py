"""Speed presets of the engine: what each one changes, and the per-call machinery that applies it.

``exact`` keeps the math of plain diffusers: the attention kernel is the fastest one available
(``optimize.choose_attention``), CFG runs as diffusers' two batch-1 forwards (measured on H100:
0.62 s each against 1.25 s for one batch-2 forward, ``shared/reference/h100_wan13b_components.json``),
text embeddings of repeated prompts come from a cache, and the VAE decodes in bfloat16 on CUDA.

``fast`` adds lossy levers, each a knob of :class:`PresetOptions`:

- fewer steps with the UniPC multistep solver (``fast_step_ratio`` of the requested steps);
- a first-block step cache (diffusers ``FirstBlockCacheConfig``): when the first block's residual
  changed by less than ``fast_cache_threshold`` since the last full step, the other blocks are skipped;
- CFG truncation: after ``fast_cfg_cutoff`` of the steps the unconditional forward is dropped.

Their deviation from the exact result is measured by ``microverse bench`` and documented in
``docs/performance.md``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import get_args

import torch

from .config import Preset, Settings
from .families import experts

logger = logging.getLogger(__name__)

PRESETS: tuple[str, ...] = get_args(Preset)


@dataclass(frozen=True)
class PresetOptions:
    """The server's preset and the knobs of the lossy levers (mirrors the ``Settings`` fields)."""

    preset: Preset = "exact"
    """Preset used when a request names none."""
    prompt_cache_size: int = 64
    """Text embeddings kept for repeated prompts; 0 disables the cache."""
    fast_step_ratio: float = 0.4
    """``fast``: fraction of the requested steps run, with UniPC."""
    fast_cfg_cutoff: float = 0.6
    """``fast``: fraction of the steps run with classifier-free guidance."""
    fast_cache_threshold: float = 0.08
    """``fast``: first-block cache threshold; 0 disables the step cache."""

    @classmethod
    def from_settings(cls, settings: Settings) -> PresetOptions:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Plan:
    """What one engine call does under a preset."""

    preset: str
    """Preset name."""
    num_inference_steps: int
    """Steps actually run."""
    unipc: bool
    """Whether the scheduler is swapped for UniPC for this call."""
    cfg_steps: int
    """Steps run with CFG (both forwards); the rest run the conditional forward only."""
    cache_threshold: float
    """First-block cache threshold; 0: no step cache."""
    scheduler: str | None = None
    """Sampler the model or adapter declares (``unipc``, ``euler``), used for this call; None: see ``unipc``."""
    flow_shift: float | None = None
    """Timestep shift of that sampler; None: the pipeline scheduler's."""


def make_plan(preset: str, requested_steps: int, guidance_scale: float, options: PresetOptions,
              scheduler: str | None = None, flow_shift: float | None = None) -> Plan:
    """The plan of ``preset`` for a request of ``requested_steps`` steps (``scheduler``/``flow_shift``: the
    declared sampler of a distilled model, which every preset keeps)."""
    if preset in ("exact", "distilled"):  # distilled: the request already carries the declared steps and guidance
        return Plan(preset, requested_steps, False, requested_steps, 0.0, scheduler, flow_shift)
    if preset != "fast":
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    steps = max(1, math.ceil(requested_steps * options.fast_step_ratio))
    cfg_steps = steps if guidance_scale <= 1 else max(1, math.ceil(steps * options.fast_cfg_cutoff))
    return Plan("fast", steps, scheduler is None, cfg_steps, options.fast_cache_threshold, scheduler, flow_shift)


def unipc_like(scheduler, shift: float | None = None):
    """A UniPC flow-matching solver with ``shift`` (default: the same shift as ``scheduler``)."""
    from diffusers import UniPCMultistepScheduler

    if isinstance(scheduler, UniPCMultistepScheduler) and shift in (None, scheduler.config.get("flow_shift")):
        return scheduler
    shift = shift or _shift_of(scheduler)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                   num_train_timesteps=scheduler.config.num_train_timesteps)


def euler_like(scheduler, shift: float | None = None):
    """A flow-matching Euler sampler with ``shift`` (default: the same shift as ``scheduler``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift or _shift_of(scheduler),
                                           num_train_timesteps=scheduler.config.num_train_timesteps)


def _shift_of(scheduler) -> float:
    return scheduler.config.get("flow_shift") or scheduler.config.get("shift") or 1.0


def scheduler_for(plan: Plan, scheduler):
    """The scheduler of one call under ``plan`` (``scheduler``, the pipeline's, when the plan swaps nothing)."""
    if plan.scheduler == "euler":
        return euler_like(scheduler, plan.flow_shift)
    if plan.scheduler == "unipc" or plan.unipc:
        return unipc_like(scheduler, plan.flow_shift)
    return scheduler


@contextmanager
def applied(pipe, plan: Plan) -> Iterator[None]:
    """Swap the scheduler and register the step-cache hooks of ``plan`` for one call; undo after."""
    scheduler = pipe.scheduler
    cached = []
    try:
        pipe.scheduler = scheduler_for(plan, scheduler)
        if plan.cache_threshold > 0:
            from diffusers import FirstBlockCacheConfig

            for transformer in experts(pipe):  # each Wan2.2 A14B expert caches its own steps
                transformer.enable_cache(FirstBlockCacheConfig(threshold=plan.cache_threshold))
                cached.append(transformer)
        yield
    finally:
        for transformer in cached:
            transformer.disable_cache()
        pipe.scheduler = scheduler


def cfg_truncation(pipe, plan: Plan, step_index: int) -> None:
    """Step callback part: from step ``plan.cfg_steps`` on, the pipeline skips the unconditional forward.

    WanPipeline checks ``do_classifier_free_guidance`` (``_guidance_scale > 1``) before each
    unconditional forward; ``_guidance_scale`` is set anew at the start of every call.
    """
    if step_index + 1 >= plan.cfg_steps and pipe._guidance_scale > 1:
        pipe._guidance_scale = 1.0


class PromptEmbeddingCache:
    """Least-recently-used cache of per-prompt text embeddings (one row each, on the pipeline's device)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def embed(self, pipe, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        """Embeddings (len(prompts), max_sequence_length, dim) of ``prompts``, encoding only the missing ones."""
        rows = []
        for prompt in prompts:
            key = (prompt, max_sequence_length)
            with self._lock:
                row = self._entries.get(key)
                if row is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
            if row is None:
                self.misses += 1
                row = pipe.encode_prompt(prompt=[prompt], do_classifier_free_guidance=False,
                                         max_sequence_length=max_sequence_length, device=pipe._execution_device)[0]
                if self.capacity > 0:
                    with self._lock:
                        self._entries[key] = row
                        while len(self._entries) > self.capacity:
                            self._entries.popitem(last=False)
            rows.append(row)
        return torch.cat(rows)
