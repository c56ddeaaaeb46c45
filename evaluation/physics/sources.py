"""Video sources for the physics evaluation, each a ``generate(prompt, seed) -> frames`` callable.

The simulator's own clips (the ceiling), those clips through a VAE (the reconstruction ceiling of any
model decoding with it), and a folder of clips. Sources that run a model checkpoint need the serving
engine, which evaluation never imports: the layer above hands one in as a :class:`ModelRunner`
(``microverse.sources.model_runner()``; ``microverse.cli`` sets it as the click context object).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.analysis import load_video
from simulator.render import render_clip, simulate_prompt

from .cases import Generate, PhysicsCase

logger = logging.getLogger(__name__)

ModelGenerate = Callable[..., Generate]
"""``model_generate(model_dir, size, frames, steps, guidance_scale, preset="exact", lora=None)``: a ``generate``
from a checkpoint folder under an engine preset, optionally with a LoRA adapter (and the sampling it declares)."""


@dataclass(frozen=True)
class ModelRunner:
    """Runs checkpoint folders for the layers that may not import the serving package (evaluation, training).

    ``microverse.sources.model_runner()`` builds the serving engine's; ``microverse.cli`` sets it as the
    ``microverse`` command's context object (``ctx.obj``), where ``microverse eval physics --model`` and
    ``microverse train demo`` / ``demo-bench`` find it.
    """

    generate: ModelGenerate
    """Videos of a checkpoint folder, through the same loading and code path as the service."""
    benchmark: Callable[[str | Path, int], dict]
    """``benchmark(model_dir, repeats)``: seconds to generate the model's default clip (median of ``repeats``
    after a warm-up), with the shape, steps and thread count it ran with."""


def simulator_generate(cases: Sequence[PhysicsCase]) -> Generate:
    """The ceiling: ``generate`` returning the real simulator clip of each case."""
    by_key = {(c.prompt, c.seed): c for c in cases}

    def generate(prompt: str, seed: int) -> np.ndarray:
        c = by_key[(prompt, seed)]
        return render_clip(c.process, c.seed, c.size, c.frames, c.looks).frames

    return generate


def simulator_prompt_generate(size: int = 64, frames: int = 17) -> Generate:
    """``generate`` rendering a simulator clip for any prompt (see ``simulator.render.simulate_prompt``)."""
    return lambda prompt, seed: simulate_prompt(prompt, seed, size, frames).frames


def load_vae(path: str | Path):
    """``AutoencoderKLWan`` from a VAE folder, or a pipeline folder or Hugging Face id with a ``vae`` subfolder."""
    from diffusers import AutoencoderKLWan

    subfolder = None if (Path(path) / "config.json").is_file() else "vae"
    return AutoencoderKLWan.from_pretrained(str(path), subfolder=subfolder).eval()


def through_vae(generate: Generate, vae) -> Generate:
    """``generate`` followed by an ``AutoencoderKLWan`` encode and decode (the posterior mean).

    Wrapping the simulator gives the reconstruction ceiling: no model decoding with that VAE can show
    what the reconstruction already loses. ``vae`` is a loaded VAE or a path for :func:`load_vae`.
    """
    import torch

    if isinstance(vae, (str, Path)):
        vae = load_vae(vae)

    def reconstruct(prompt: str, seed: int) -> np.ndarray:
        frames = load_video(generate(prompt, seed))
        x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(vae.dtype) / 127.5 - 1
        with torch.no_grad():
            rec = vae(x, sample_posterior=False).sample[0].float().clamp(-1, 1)
        return ((rec.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)

    return reconstruct


def folder_cases(videos_dir: str | Path) -> tuple[list[PhysicsCase], Generate]:
    """Cases and a ``generate`` reading ``videos_dir/metadata.json`` (the format ``write_dataset`` writes)."""
    root = Path(videos_dir)
    entries = json.loads((root / "metadata.json").read_text())
    cases, paths = [], {}
    for e in entries:
        c = PhysicsCase(
            e["id"],
            e["process"],
            e["prompt"],
            int(e.get("seed", 0)),
            e["params"],
            e.get("size", 64),
            e.get("frames", 17),
        )
        cases.append(c)
        paths[(c.prompt, c.seed)] = root / e["video"]
    return cases, lambda prompt, seed: load_video(paths[(prompt, seed)])
