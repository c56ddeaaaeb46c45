"""Request models and their validation at the edge.

Pydantic checks types and rejects unknown fields; :func:`check_inputs` applies the limits of
the running service and the shape rules of the Wan VAE, and names the offending parameter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from .config import Preset
from .loading import ModelDefaults

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1


class InputError(ValueError):
    """Bad input; ``param`` names the field (returned as a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


def encodable(text: str) -> str:
    """``text`` unchanged when UTF-8 can encode it; a validation error otherwise.

    JSON's ``\\ud800`` escape (or a multipart field in a charset such as UTF-7) can carry a lone surrogate,
    which no response, log line or hash can encode: such text is refused at the edge, before anything is stored.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_text", "not valid UTF-8 text: a lone surrogate at character {position}", {"position": exc.start}
        ) from None
    return text


Text = Annotated[str, AfterValidator(encodable)]
"""A string field that must be encodable as UTF-8 (see :func:`encodable`)."""


@dataclass(frozen=True)
class Limits:
    """What the running service accepts."""

    max_pixels: int
    """Largest height x width."""
    max_frames: int
    """Largest num_frames."""
    max_steps: int
    """Largest num_inference_steps."""
    max_side: int = 1 << 30
    """Largest height or width the model's positional embedding covers."""
    adapters: tuple[str, ...] = ()
    """Named adapters a request may pick."""


class GenerateRequest(BaseModel):
    """Body of ``POST /generate``. Omitted fields take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(description="What the video should show (1-2000 characters).")
    negative_prompt: Text | None = Field(None, description="What to steer away from.")
    height: int | None = Field(None, description="Pixels, a multiple of 16.")
    width: int | None = Field(None, description="Pixels, a multiple of 16.")
    num_frames: int | None = Field(None, description="Frames, of the form 4k+1.")
    num_inference_steps: int | None = Field(None, description="Denoising steps.")
    guidance_scale: float | None = Field(None, description="Classifier-free guidance, 0-20.")
    seed: int | None = Field(None, description="Random seed; omitted: a random one, returned in X-Seed.")
    fps: int | None = Field(None, description="Frames per second of the mp4 (1-60).")
    preset: Preset | None = Field(None, description="Speed preset (exact, fast or distilled); omitted: the server's.")
    lora: Text | None = Field(None, description="Named adapter to apply (GET /v1/models lists them); omitted: none.")
    lora_scale: float | None = Field(None, allow_inf_nan=False, description="Strength of that adapter, 0-4 (1).")
    image: Text | None = Field(None, description="Reference image of an image-conditioned model (I2V, TI2V): a data "
                                                 "URL or base64 (or a multipart file field 'image').")


@dataclass(frozen=True)
class GenerationSpec:
    """A fully resolved generation: what the engine runs for one video."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    fps: int
    preset: str | None = None
    """Speed preset; None: the server's (``MICROVERSE_PRESET``)."""
    lora: str | None = None
    """Named adapter (``MICROVERSE_LORAS``) to apply; None: only the always-on LoRAs."""
    lora_scale: float = 1.0
    """Strength of ``lora``."""
    scheduler: str | None = None
    """Sampler the model or adapter declares (``unipc`` or ``euler``); None: the pipeline's own."""
    flow_shift: float | None = None
    """Timestep shift the model or adapter declares; None: the scheduler's own."""
    image: str | None = None
    """Stored reference image (``microverse.images``: fitted to the size, content-addressed PNG); None: text only."""

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one engine call (one adapter, sampler and reference image per call:
        diffusers' I2V pipeline conditions a whole batch on one image)."""
        return (self.negative_prompt, self.height, self.width, self.num_frames, self.num_inference_steps,
                self.guidance_scale, self.preset, self.lora, self.lora_scale, self.scheduler, self.flow_shift,
                self.image)

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps


def check_inputs(
    *, prompt: str, height: int, width: int, num_frames: int, num_inference_steps: int,
    guidance_scale: float, fps: int, seed: int, negative_prompt: str, limits: Limits,
) -> None:
    """Raise :class:`InputError` naming the first parameter that is out of bounds."""
    if not prompt or not prompt.strip():
        raise InputError("prompt", "prompt must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError("prompt", f"prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    if len(negative_prompt) > MAX_PROMPT_CHARS:
        raise InputError("negative_prompt", f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters")
    for name, value in (("height", height), ("width", width)):
        if value < 16 or value % 16:
            raise InputError(name, f"{name} must be a positive multiple of 16, got {value}")
        if value > limits.max_side:
            raise InputError(name, f"{name} {value} exceeds what this model supports ({limits.max_side})")
    if height * width > limits.max_pixels:
        raise InputError("height", f"height x width = {height * width} exceeds the limit of {limits.max_pixels} pixels")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise InputError("num_frames", f"num_frames must be of the form 4k+1 (1, 5, 9, ...), got {num_frames}")
    if num_frames > limits.max_frames:
        raise InputError("num_frames", f"num_frames {num_frames} exceeds the limit of {limits.max_frames}")
    if not 1 <= num_inference_steps <= limits.max_steps:
        raise InputError(
            "num_inference_steps", f"num_inference_steps must be in 1..{limits.max_steps}, got {num_inference_steps}"
        )
    if not 0 <= guidance_scale <= 20:
        raise InputError("guidance_scale", f"guidance_scale must be in 0..20, got {guidance_scale}")
    check_fps(fps)
    if not 0 <= seed <= MAX_SEED:
        raise InputError("seed", f"seed must be in 0..{MAX_SEED}, got {seed}")


def check_fps(fps: int) -> None:
    """Raise :class:`InputError` unless ``fps`` is in 1..60."""
    if not 1 <= fps <= 60:
        raise InputError("fps", f"fps must be in 1..60, got {fps}")


def resolve(req: GenerateRequest, defaults: ModelDefaults, limits: Limits) -> GenerationSpec:
    """Fill omitted fields from the model defaults, validate, and return the spec."""
    values = {name: getattr(defaults, name) if getattr(req, name) is None else getattr(req, name)
              for name in ("negative_prompt", "height", "width", "num_frames", "num_inference_steps",
                           "guidance_scale", "fps")}
    seed = random.SystemRandom().randrange(2**31) if req.seed is None else req.seed
    check_inputs(prompt=req.prompt, seed=seed, limits=limits, **values)
    lora_scale = check_adapter(req.lora, req.lora_scale, limits)
    check_distilled(req, defaults)
    return GenerationSpec(prompt=req.prompt, seed=seed, preset=req.preset, lora=req.lora, lora_scale=lora_scale,
                          scheduler=defaults.scheduler, flow_shift=defaults.flow_shift, **values)


def check_distilled(req: GenerateRequest, defaults: ModelDefaults) -> None:
    """:class:`InputError` for guidance on a CFG-distilled model (``guidance_scale``), and for the ``distilled``
    preset on a model that declares no distilled sampling (``preset``) or with steps or guidance other than the
    declared ones."""
    if defaults.cfg_distilled and req.guidance_scale is not None and req.guidance_scale > 1:
        raise InputError("guidance_scale", f"this model is CFG-distilled (one forward per step): guidance_scale "
                                           f"must be at most 1, got {req.guidance_scale:g}; omit it")
    if req.preset != "distilled":
        return
    if not defaults.distilled:
        raise InputError("preset", "preset 'distilled' needs a checkpoint or adapter that declares its distilled "
                                   "sampling (microverse_defaults); this one does not")
    for name in ("num_inference_steps", "guidance_scale"):
        asked, declared = getattr(req, name), getattr(defaults, name)
        if asked is not None and asked != declared:
            raise InputError(name, f"preset 'distilled' runs the declared {name}={declared:g}; omit {name} "
                                   "or choose another preset")


def check_adapter(lora: str | None, lora_scale: float | None, limits: Limits) -> float:
    """The adapter's scale (1 when omitted); :class:`InputError` naming ``lora`` or ``lora_scale`` when the adapter is
    not served here or the scale is outside 0..4."""
    if lora is not None and lora not in limits.adapters:
        served = ", ".join(limits.adapters) or "none"
        raise InputError("lora", f"no adapter named {lora!r} is served here (adapters: {served})")
    if lora_scale is None:
        return 1.0
    if lora is None:
        raise InputError("lora_scale", "lora_scale needs lora (the adapter it scales)")
    if not 0 <= lora_scale <= 4:
        raise InputError("lora_scale", f"lora_scale must be in 0..4, got {lora_scale:g}")
    return lora_scale
