"""Wan model families, told apart by a checkpoint's ``model_index.json`` (the diffusers pipeline layout).

| family          | pipeline                | what tells it                          | experts | inputs      |
|-----------------|-------------------------|----------------------------------------|---------|-------------|
| wan2.1-t2v      | WanPipeline             | one transformer                        | 1       | text        |
| wan2.2-t2v-a14b | WanPipeline             | ``transformer_2``, ``boundary_ratio``  | 2       | text        |
| wan2.2-ti2v     | WanPipeline             | ``expand_timesteps``                   | 1       | text        |
| wan2.1-i2v      | WanImageToVideoPipeline | a CLIP ``image_encoder``               | 1       | text, image |
| wan2.2-i2v-a14b | WanImageToVideoPipeline | ``transformer_2``, no image encoder    | 2       | text, image |

TI2V runs as ``WanPipeline`` from text alone and as ``WanImageToVideoPipeline`` (same components, its first frame
fixed to the reference) when a request brings an image; the I2V families need an image in every request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """A Wan model family."""

    name: str
    """Short id (``/info``, ``GET /v1/models``)."""
    title: str
    """Human-readable name."""
    pipeline: str
    """diffusers pipeline class that runs it."""
    image: Literal["none", "optional", "required"]
    """Whether a request may (TI2V) or must (I2V) bring a reference image."""
    experts: int
    """Denoising transformers (2: Wan2.2 A14B's high-noise and low-noise experts)."""

    @property
    def inputs(self) -> tuple[str, ...]:
        """What a request gives the model: ``text``, and ``image`` when it takes one."""
        return ("text",) if self.image == "none" else ("text", "image")


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("wan2.1-t2v", "Wan2.1 text-to-video", "WanPipeline", "none", 1),
    Family("wan2.2-t2v-a14b", "Wan2.2 text-to-video A14B (two experts)", "WanPipeline", "none", 2),
    Family("wan2.2-ti2v", "Wan2.2 text-and-image-to-video", "WanPipeline", "optional", 1),
    Family("wan2.1-i2v", "Wan2.1 image-to-video", "WanImageToVideoPipeline", "required", 1),
    Family("wan2.2-i2v-a14b", "Wan2.2 image-to-video A14B (two experts)", "WanImageToVideoPipeline", "required", 2),
)}  # fmt: skip


class UnknownFamilyError(ValueError):
    """A ``model_index.json`` of no Wan family this service knows."""


def _has(index: dict[str, Any], component: str) -> bool:
    """Whether ``model_index.json`` names a (non-null) ``component``."""
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def detect_family(index: dict[str, Any]) -> Family:
    """The family of a checkpoint from its ``model_index.json``; :class:`UnknownFamilyError` naming the class
    otherwise."""
    cls = index.get("_class_name")
    two_experts = _has(index, "transformer_2")
    if cls == "WanPipeline":
        if index.get("expand_timesteps"):
            return FAMILIES["wan2.2-ti2v"]
        return FAMILIES["wan2.2-t2v-a14b" if two_experts else "wan2.1-t2v"]
    if cls == "WanImageToVideoPipeline":
        if _has(index, "image_encoder"):
            return FAMILIES["wan2.1-i2v"]
        return FAMILIES["wan2.2-i2v-a14b" if two_experts else "wan2.2-ti2v"]
    known = ", ".join(sorted({f.pipeline for f in FAMILIES.values()}))
    raise UnknownFamilyError(f"model_index.json names pipeline {cls!r}; this service runs Wan checkpoints ({known})")


def read_model_index(source: str) -> dict[str, Any]:
    """``model_index.json`` of a local folder or Hugging Face id (diffusers' own config loader)."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(source))


def image_pipeline(pipe, family: Family):
    """The pipeline that runs image-conditioned requests: ``pipe`` itself for I2V, an I2V view sharing its
    components for TI2V, None for text-only families."""
    if family.image == "none":
        return None
    if family.pipeline == "WanImageToVideoPipeline":
        return pipe
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pipe(pipe)


def experts(pipe) -> list:
    """The denoising transformers of a loaded pipeline (two for Wan2.2 A14B)."""
    return [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]
