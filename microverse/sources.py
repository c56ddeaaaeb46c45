"""Checkpoint folders run through the serving engine, for the layers that may not import it.

``engine_generate`` is a physics-evaluation video source (``generate(prompt, seed) -> frames``) and
``benchmark_generation`` times a model's default clip; both load the checkpoint exactly as the service does,
so what they measure is what users get. ``model_runner()`` bundles them as the
:class:`evaluation.physics.ModelRunner` that ``microverse.cli`` hands to ``microverse eval physics`` and
``microverse train demo`` / ``demo-bench``.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from evaluation.physics import Generate, ModelRunner

from .config import Settings
from .engine import DiffusersEngine
from .schemas import GenerationSpec

logger = logging.getLogger(__name__)

BENCH_PROMPT = "a cell divides into two daughter cells"
"""Prompt of the timed clip (the mitosis acceptance prompt)."""


ADAPTER = "adapter"
"""Name the adapter of :func:`engine_generate` is served under."""


def _engine(model_dir: str | Path, lora: str | Path | None = None) -> DiffusersEngine:
    loras = {ADAPTER: str(lora)} if lora is not None else {}
    return DiffusersEngine.from_settings(Settings(model=str(model_dir), loras=loras))


def engine_generate(
    model_dir: str | Path, size: int = 64, frames: int = 17, steps: int = 20, guidance_scale: float = 5.0,
    preset: str = "exact", lora: str | Path | None = None,
) -> Generate:
    """``generate(prompt, seed) -> frames`` of a checkpoint folder through the serving engine, at ``size``
    x ``size``, ``frames`` frames, ``steps`` denoising steps and CFG ``guidance_scale`` (the model's default
    negative prompt), under ``preset``; with ``lora``, that LoRA as a named adapter with the sampler it declares."""
    engine = _engine(model_dir, lora)
    adapter = ADAPTER if lora is not None else None
    defaults = engine.model.defaults_for(adapter)

    def generate(prompt: str, seed: int) -> np.ndarray:
        spec = GenerationSpec(prompt=prompt, negative_prompt=defaults.negative_prompt, height=size, width=size,
                              num_frames=frames, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                              fps=16, preset=preset, lora=adapter, scheduler=defaults.scheduler,
                              flow_shift=defaults.flow_shift)  # fmt: skip
        return engine.generate([spec]).videos[0]

    return generate


def benchmark_generation(model_dir: str | Path, repeats: int = 5) -> dict:
    """Seconds to generate the model's default clip through the serving engine (one warm-up, then
    ``repeats`` timed runs; median reported), with the torch thread count it ran on."""
    engine = _engine(model_dir)
    d = engine.model.defaults
    spec = GenerationSpec(prompt=BENCH_PROMPT, negative_prompt=d.negative_prompt, height=d.height, width=d.width,
                          num_frames=d.num_frames, num_inference_steps=d.num_inference_steps,
                          guidance_scale=d.guidance_scale, seed=0, fps=d.fps)  # fmt: skip
    engine.generate([spec])
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        engine.generate([replace(spec, seed=i + 1)])
        times.append(time.perf_counter() - t0)
    return {"seconds_median": statistics.median(times), "seconds": times, "threads": torch.get_num_threads(),
            "shape": [d.num_frames, d.height, d.width], "steps": d.num_inference_steps}  # fmt: skip


def model_runner() -> ModelRunner:
    """The serving engine as the evaluation and training layers' :class:`~evaluation.physics.ModelRunner`."""
    return ModelRunner(generate=engine_generate, benchmark=benchmark_generation)
