"""Checkpoint sources: a diffusers folder or Hugging Face id, LoRA (every Wan layout: ``microverse.lora``), a
full DiT in original Wan keys, and the embedded default model.

Nothing is silently ignored: a LoRA or DiT key that matches no module (or the wrong shape) stops
loading with a :class:`CheckpointError` that names it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import Settings
from .families import (
    FAMILIES,
    Family,
    UnknownFamilyError,
    detect_family,
    experts,
    image_pipeline,
    read_model_index,
)
from .lora import LoraFormatError, format_keys, to_diffusers, user_names

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "microverse-demo"
"""The embedded default model: the demo pipeline shipped in the package (``training.demo``)."""
EMBEDDED_DESCRIPTION = (
    "Embedded default: microverse-demo, a small Wan2.1-architecture model trained from scratch on CPU on "
    "procedural simulator clips (diffusion, mitosis, blood flow, chemotaxis, vesicle transport, apoptosis); "
    "48x48x17 microscopy-like clips, model card in its README.md. A demo, not a scientific model: point "
    "MICROVERSE_MODEL at a real checkpoint (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) for real videos."
)
DEFAULTS_FILE = "microverse_defaults.json"
"""Optional file in a checkpoint folder overriding :class:`ModelDefaults`."""
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry in which diffusers saves a LoRA's adapter config (rank, alpha)."""
DEFAULTS_METADATA_KEY = "microverse_defaults"
"""The safetensors metadata entry in which a LoRA declares its own :class:`ModelDefaults` fields (JSON)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded as asked; the message says what and why."""


@dataclass
class ModelDefaults:
    """Generation defaults of a model (Wan2.1's unless the checkpoint folder says otherwise)."""

    height: int = 480
    """Default video height in pixels."""
    width: int = 832
    """Default video width in pixels."""
    num_frames: int = 81
    """Default frame count (4k+1)."""
    num_inference_steps: int = 50
    """Default denoising steps."""
    guidance_scale: float = 5.0
    """Default classifier-free guidance scale."""
    fps: int = 16
    """Default frames per second of the encoded video."""
    max_sequence_length: int = 512
    """Text tokens fed to the encoder."""
    negative_prompt: str = ""
    """Default negative prompt."""
    scheduler: Literal["unipc", "euler"] | None = None
    """Sampler a step-distilled checkpoint or adapter was trained for: ``unipc`` (diffusers' Wan default) or
    ``euler`` (flow-matching Euler); None: the pipeline's own scheduler."""
    flow_shift: float | None = None
    """Timestep shift for that sampler; None: the scheduler's own."""
    cfg_distilled: bool = False
    """Guidance is distilled into the weights: one forward per step (guidance 1), and a request for guidance
    above 1 is refused."""

    @property
    def distilled(self) -> bool:
        """Whether these defaults declare a distilled sampling (what the ``distilled`` preset runs)."""
        return self.cfg_distilled or self.scheduler is not None


def defaults_from(data: Any, base: ModelDefaults, source: str) -> ModelDefaults:
    """``base`` with the known fields of ``data`` (a ``microverse_defaults`` object) on top, type-checked;
    :class:`CheckpointError` naming ``source`` and the field otherwise."""
    from pydantic import TypeAdapter, ValidationError

    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: microverse defaults must be a JSON object, got {type(data).__name__}")
    known = {k: v for k, v in data.items() if k in ModelDefaults.__dataclass_fields__}
    try:
        return TypeAdapter(ModelDefaults).validate_python({**asdict(base), **known})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise CheckpointError(f"{source}: microverse defaults field {'.'.join(map(str, err['loc']))}: "
                              f"{err['msg']}") from None


@dataclass
class LoadedModel:
    """A loaded pipeline and what the service reports about it."""

    pipe: object
    """The diffusers ``WanPipeline``."""
    name: str
    """Model name reported by the API."""
    source: str
    """Where the base weights came from (path or hub id)."""
    description: str
    """Human-readable description (says plainly when the model is the random embedded one)."""
    defaults: ModelDefaults
    """Generation defaults."""
    loras: list[str] = field(default_factory=list)
    """LoRA files applied to every request (adapters ``lora_0``, ``lora_1``, ...)."""
    lora_scale: float = 1.0
    """Strength of those LoRAs."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Named adapters a request may pick: name -> LoRA file."""
    adapter_defaults: dict[str, ModelDefaults] = field(default_factory=dict)
    """Defaults of the adapters whose file declares its own (a distilled adapter: steps, guidance, sampler)."""
    transformer_override: str | None = None
    """Full fine-tuned DiT applied, if any."""
    transformer_2_override: str | None = None
    """Full fine-tune of Wan2.2 A14B's low-noise expert applied, if any."""
    family: Family = FAMILIES["wan2.1-t2v"]
    """Model family (from ``model_index.json``)."""
    image_pipe: object | None = None
    """The pipeline of image-conditioned requests (``pipe`` for I2V, an I2V view of it for TI2V), if any."""

    def defaults_for(self, adapter: str | None) -> ModelDefaults:
        """The defaults of a request that picks ``adapter`` (the model's own when the adapter declares none)."""
        return self.adapter_defaults.get(adapter, self.defaults) if adapter is not None else self.defaults


def embedded_model_path() -> Path:
    """Path of the embedded default model (shipped inside the package)."""
    if not (EMBEDDED_DIR / "model_index.json").exists():
        raise CheckpointError(
            f"the embedded demo model is missing from {EMBEDDED_DIR}: reinstall MicroVerse, or set MICROVERSE_MODEL "
            "to a checkpoint (e.g. the model/ folder that `make demo-model` writes under outputs/demo)"
        )
    return EMBEDDED_DIR


def read_defaults(source: str) -> ModelDefaults:
    """``microverse_defaults.json`` from a local checkpoint folder, else Wan2.1's defaults."""
    path = Path(source) / DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return defaults_from(data, ModelDefaults(), str(path))


def _read_safetensors(path: Path, preferred: str | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors.torch import load_file

    if path.is_dir():
        if preferred and (path / preferred).is_file():
            path = path / preferred
        else:
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise CheckpointError(
                    f"{path}: expected {preferred or 'one .safetensors file'} in the folder, found "
                    f"{[f.name for f in files] or 'none'}"
                )
            path = files[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path)), path
    except Exception as exc:  # safetensors raises several types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def check_lora_keys(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                    names: dict[str, str] | None = None) -> None:
    """Raise if a (diffusers-key) LoRA tensor names no Linear of ``transformer`` or has the wrong shape; ``names``
    maps a module to its name in the user's file, which the error then gives too."""
    modules = dict(transformer.named_modules())
    names = names or {}
    problems: list[str] = []
    for key, value in state_dict.items():
        module_name, kind, leaf = key[len("transformer."):].rsplit(".", 2)
        mod = getattr(modules.get(module_name), "base_layer", modules.get(module_name))  # under an earlier adapter
        theirs = f", {names[module_name]} in the file" if module_name in names else ""
        if not isinstance(mod, torch.nn.Linear):
            problems.append(f"{key} (no Linear '{module_name}' in the transformer{theirs})")
        elif kind == "lora_A" and (value.ndim != 2 or value.shape[1] != mod.in_features):
            problems.append(f"{key} (in_features {value.shape[-1]} != {mod.in_features}{theirs})")
        elif kind == "lora_B" and leaf == "weight" and (value.ndim != 2 or value.shape[0] != mod.out_features):
            problems.append(f"{key} (out_features {value.shape[0]} != {mod.out_features}{theirs})")
        elif kind == "lora_B" and leaf == "bias" and value.shape != (mod.out_features,):
            problems.append(f"{key} (bias of {tuple(value.shape)} != ({mod.out_features},){theirs})")
    if problems:
        raise CheckpointError(f"LoRA {source} does not fit this model; unmatched keys: {format_keys(problems)}")


@dataclass
class LoraFile:
    """A LoRA file read and converted to diffusers keys."""

    file: Path
    """The safetensors file."""
    state_dict: dict[str, torch.Tensor]
    """Tensors under diffusers keys ``transformer.<module>.lora_{A,B}.<weight|bias>``, alpha folded in."""
    metadata: dict | None
    """Adapter config (rank, alpha) a diffusers-saved file carries in its metadata."""
    names: dict[str, str]
    """Diffusers module name -> its name in the file (for errors)."""
    defaults: dict | None = None
    """The ``microverse_defaults`` the file's metadata declares (a distilled adapter's sampling), if any."""


def read_lora(path: str) -> LoraFile:
    """A LoRA file (or a folder holding one) in any layout of :mod:`microverse.lora`; :class:`CheckpointError`
    names the file's keys on any problem."""
    sd, file = _read_safetensors(Path(path), preferred="pytorch_lora_weights.safetensors")
    try:
        converted = to_diffusers(sd, file)
    except LoraFormatError as exc:
        raise CheckpointError(f"LoRA {file}: {exc}") from None
    header = _metadata(file)
    return LoraFile(file=file, state_dict=converted, metadata=_json_entry(header, LORA_ADAPTER_METADATA_KEY, file),
                    names=user_names(sd), defaults=_json_entry(header, DEFAULTS_METADATA_KEY, file))


def _metadata(file: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata() or {}


def _json_entry(metadata: dict[str, str], key: str, file: Path) -> dict | None:
    """The JSON object under ``key`` in a safetensors file's metadata, if it has one."""
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except ValueError as exc:
        raise CheckpointError(f"{file}: metadata {key} is not valid JSON ({exc})") from None


def load_adapter(pipe, path: str, name: str) -> LoraFile:
    """Load the LoRA at ``path`` into the transformer (both experts of Wan2.2 A14B) as adapter ``name`` (not
    activated)."""
    lora = read_lora(path)
    check_lora_keys(pipe.transformer, lora.state_dict, str(lora.file), lora.names)
    for transformer in experts(pipe):  # Wan2.2 A14B: the same adapter in both experts
        pipe.load_lora_into_transformer(dict(lora.state_dict), transformer=transformer, adapter_name=name,
                                        metadata=lora.metadata, _pipeline=pipe)
    logger.info("LoRA %s loaded (%d tensors) as %s", lora.file, len(lora.state_dict), name)
    return lora


def activate(pipe, model: LoadedModel, adapter: str | None = None, scale: float = 1.0) -> None:
    """Make the always-on LoRAs plus the named ``adapter`` (at ``scale``) the active ones (``set_adapters``:
    weights already loaded, nothing reloaded)."""
    names = [f"lora_{i}" for i in range(len(model.loras))]
    weights = [model.lora_scale] * len(names)
    if adapter is not None:
        names.append(adapter)
        weights.append(scale)
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, weights)
    elif model.adapters:
        pipe.disable_lora()


def apply_transformer(pipe, source: str, expert: str = "transformer") -> str:
    """Replace the pipeline's DiT ``expert`` (``transformer``, or Wan2.2 A14B's low-noise ``transformer_2``) with a
    full fine-tune: a diffusers folder or original-Wan safetensors."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = Path(source)
    base = getattr(pipe, expert)
    if path.is_dir() and (path / "config.json").is_file():
        new = WanTransformer3DModel.from_pretrained(str(path), dtype=base.dtype)
        if dict(new.config) != dict(base.config):
            diff = sorted(k for k in base.config if new.config.get(k) != base.config.get(k))
            logger.warning("fine-tuned %s config differs from base in %s", expert, diff)
        setattr(pipe, expert, new)
        return str(path)
    sd, file = _read_safetensors(path)
    converted = convert_wan_transformer_to_diffusers(dict(sd))
    expected = base.state_dict()
    unexpected = sorted(set(converted) - set(expected))
    missing = sorted(set(expected) - set(converted))
    wrong = sorted(k for k in set(converted) & set(expected) if converted[k].shape != expected[k].shape)
    if unexpected or missing or wrong:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys: {format_keys(unexpected)}")
        if missing:
            parts.append(f"missing keys: {format_keys(missing)}")
        if wrong:
            parts.append(f"shape mismatches: {format_keys(wrong)}")
        raise CheckpointError(f"DiT {file} does not fit the base model; " + "; ".join(parts))
    base.load_state_dict({k: v.to(expected[k].dtype) for k, v in converted.items()}, strict=True)
    return str(file)


def load_pipeline(
    settings: Settings, torch_dtype: torch.dtype = torch.float32, quantization_config=None
) -> LoadedModel:
    """Load the base pipeline and apply the fine-tune and LoRAs the settings name.

    ``quantization_config`` is a diffusers ``PipelineQuantizationConfig`` (see ``optimize``).
    """
    source = model_source(settings)
    family = checkpoint_family(source)
    description = f"{family.title} checkpoint {source}" if settings.model else EMBEDDED_DESCRIPTION
    pipe = load_family_pipeline(source, family, torch_dtype, quantization_config)
    if settings.transformer_2 and family.experts == 1:
        raise CheckpointError(f"MICROVERSE_TRANSFORMER_2: {family.title} has one transformer; the low-noise expert "
                              "exists only in Wan2.2 A14B checkpoints")
    transformer_override = apply_transformer(pipe, settings.transformer) if settings.transformer else None
    transformer_2_override = (apply_transformer(pipe, settings.transformer_2, "transformer_2")
                              if settings.transformer_2 else None)
    defaults = read_defaults(source)
    loras = [load_adapter(pipe, p, f"lora_{i}") for i, p in enumerate(settings.lora)]
    for lora in loras:  # an always-on LoRA that declares its sampling (a distillation LoRA) sets the model's
        if lora.defaults is not None:
            defaults = defaults_from(lora.defaults, defaults, str(lora.file))
    adapters = {name: load_adapter(pipe, p, name) for name, p in settings.loras.items()}
    name = settings.model_name or (Path(source).name if not settings.model or Path(source).exists() else source)
    model = LoadedModel(
        pipe=pipe, name=name, source=source, description=description, defaults=defaults,
        loras=[str(lora.file) for lora in loras], lora_scale=settings.lora_scale,
        adapters={n: str(lora.file) for n, lora in adapters.items()},
        adapter_defaults={n: defaults_from(lora.defaults, defaults, str(lora.file))
                          for n, lora in adapters.items() if lora.defaults is not None},
        transformer_override=transformer_override, transformer_2_override=transformer_2_override, family=family,
        image_pipe=image_pipeline(pipe, family),
    )
    activate(pipe, model)
    return model


def model_source(settings: Settings) -> str:
    """The checkpoint the settings name (a folder or Hugging Face id), else the embedded demo model's folder."""
    if not settings.model:
        return str(embedded_model_path())
    source = settings.model
    if not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise CheckpointError(f"MICROVERSE_MODEL={source!r}: no such folder and not a Hugging Face id")
    return source


def load_family_pipeline(source: str, family: Family, torch_dtype: torch.dtype, quantization_config=None):
    """The diffusers pipeline of ``family`` from ``source``; the Wan VAE stays in float32 (numerically sensitive),
    the rest takes ``torch_dtype``."""
    import diffusers

    try:
        return getattr(diffusers, family.pipeline).from_pretrained(
            source, dtype={"vae": torch.float32, "default": torch_dtype}, quantization_config=quantization_config
        )
    except Exception as exc:
        raise CheckpointError(f"could not load a {family.pipeline} from {source!r}: {exc}") from exc


def checkpoint_family(source: str) -> Family:
    """The :class:`~microverse.families.Family` of a checkpoint; :class:`CheckpointError` when its
    ``model_index.json`` is missing or names no Wan family."""
    try:
        family = detect_family(read_model_index(source))
    except UnknownFamilyError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    except Exception as exc:  # missing or unreadable model_index.json, hub errors
        raise CheckpointError(f"could not read model_index.json of {source!r}: {exc}") from exc
    return family
