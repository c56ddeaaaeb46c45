"""OpenAI's video protocol: the ``/v1/videos`` request and response models and their mapping to ours.

The official ``openai`` client works unchanged with ``base_url`` pointed at ``<service>/v1``:
``videos.create`` (multipart or JSON), ``retrieve``, ``list``, ``delete``, ``download_content``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import printable
from .jobs import Job
from .schemas import GenerateRequest, InputError, Text, check_fps

logger = logging.getLogger(__name__)

SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageReference(BaseModel):
    """OpenAI's image reference object (``image_url`` only: this server stores no files)."""

    model_config = ConfigDict(extra="forbid")

    image_url: Text = Field(description="A base64 data URL of the image (remote URLs are not fetched).")


class VideoCreateBody(BaseModel):
    """``POST /v1/videos``: OpenAI's fields plus MicroVerse's extras (sent via ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text
    model: Text | None = None
    size: Text | None = Field(None, description='"WIDTHxHEIGHT", e.g. "832x480".')
    seconds: float | None = Field(None, allow_inf_nan=False,
                                  description="Clip length; converted to 4k+1 frames at fps.")
    negative_prompt: Text | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_frames: int | None = Field(None, description="Overrides seconds when given (4k+1).")
    fps: int | None = None
    lora: Text | None = Field(None, description="Named adapter (also chosen by naming it as the model).")
    lora_scale: float | None = Field(None, allow_inf_nan=False, description="Strength of the adapter, 0-4 (1).")
    input_reference: Text | ImageReference | None = Field(
        None, description="Reference image of an image-conditioned model: a file (multipart, as the openai client "
                          "uploads it), a data URL, or {\"image_url\": data URL}.")

    @model_validator(mode="before")
    @classmethod
    def _nested_form_keys(cls, data: Any) -> Any:
        """Multipart flattens ``input_reference={"image_url": ...}`` to ``input_reference[image_url]``."""
        if isinstance(data, dict) and any(k.startswith("input_reference[") for k in data):
            data = dict(data)
            data["input_reference"] = {k[len("input_reference["):-1]: data.pop(k) for k in list(data)
                                       if k.startswith("input_reference[") and k.endswith("]")}
        return data

    def reference_data_url(self) -> str | None:
        """The data URL of a JSON ``input_reference``, if the body has one."""
        ref = self.input_reference
        return ref.image_url if isinstance(ref, ImageReference) else ref


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """OpenAI's ``Video`` object, plus the generation parameters used."""

    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None
    expires_at: int | None
    status: Literal["queued", "in_progress", "completed", "failed"]
    model: str
    progress: int
    prompt: str
    seconds: str
    size: str
    error: VideoError | None
    remixed_from_video_id: str | None = None
    seed: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    fps: int
    lora: str | None = None
    """The named adapter the video was made with (None: the base model)."""


def to_video_object(job: Job) -> VideoObject:
    """A stored job as OpenAI's ``Video`` object (its text made encodable: rows stored before the edge refused
    lone surrogates must still render)."""
    s = job.spec
    return VideoObject(
        id=job.id, created_at=int(job.created_at),
        completed_at=int(job.completed_at) if job.completed_at else None,
        expires_at=int(job.expires_at) if job.expires_at else None,
        status=job.status, model=job.model, progress=job.progress, prompt=printable(s.prompt),
        seconds=f"{s.seconds:g}", size=f"{s.width}x{s.height}",
        error=(VideoError(code=job.error_code or "error", message=printable(job.error_message or ""))
               if job.status == "failed" else None),
        seed=s.seed, num_frames=s.num_frames, num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale, fps=s.fps, lora=s.lora,
    )


def to_generate_request(body: VideoCreateBody, fps_default: int, max_frames: int,
                        adapter: str | None = None) -> GenerateRequest:
    """Map OpenAI's size/seconds onto our request fields (``adapter``: the one ``model`` named, if any)."""
    width = height = None
    if body.size is not None:
        m = SIZE_RE.match(body.size.strip())
        if not m:
            raise InputError("size", f'size must look like "832x480" (width x height), got {body.size!r}')
        width, height = int(m.group(1)), int(m.group(2))
    num_frames = body.num_frames
    if num_frames is None and body.seconds is not None:
        num_frames = frames_for(body.seconds, body.fps or fps_default, max_frames)
    return GenerateRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, height=height, width=width,
                           num_frames=num_frames, num_inference_steps=body.num_inference_steps,
                           guidance_scale=body.guidance_scale, seed=body.seed, fps=body.fps,
                           lora=body.lora or adapter, lora_scale=body.lora_scale)


def frames_for(seconds: float, fps: int, max_frames: int) -> int:
    """``seconds`` (finite) at ``fps`` as the nearest 4k+1 frame count; :class:`InputError` naming ``fps`` or
    ``seconds`` unless the fps is valid and the clip positive and within ``max_frames``."""
    check_fps(fps)  # before the arithmetic: a huge integer fps cannot even be multiplied by a float
    if seconds <= 0:
        raise InputError("seconds", f"seconds must be positive, got {seconds:g}")
    exact = min(seconds * fps, max_frames + 4.0)  # clamped (still over the limit once rounded): 1e308 s is inf
    num_frames = 4 * max(0, round((exact - 1) / 4)) + 1  # nearest 4k+1
    if num_frames > max_frames:
        raise InputError("seconds", f"seconds={seconds:g} at {fps} fps is more than the limit of {max_frames} frames")
    return num_frames
