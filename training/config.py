"""Training configs as code (with a debug size that runs on CPU), loadable from YAML too.

``load_config("debug")`` returns a registered config, ``load_config("run.yaml")`` reads a YAML file
whose sections mirror :class:`TrainConfig`, and ``overrides`` (``["optim.lr=1e-4", ...]``) patch any
field by its dotted path. Every value is validated against its field's type (pydantic), so a typo'd key or a
value of the wrong type stops loading with a :class:`ConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

logger = logging.getLogger(__name__)

#: LoRA targets of the upstream MicroVerse trainer, in original Wan module names.
UPSTREAM_LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
#: The same modules in diffusers ``WanTransformer3DModel`` names (self- and cross-attention).
DIFFUSERS_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


@dataclass
class ModelConfig:
    """What to fine-tune and how."""

    pretrained: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    """Diffusers Wan pipeline folder or Hugging Face id (VAE, text encoder and DiT come from it)."""
    mode: str = "lora"
    """``lora`` (peft adapters on a frozen DiT) or ``full`` (every DiT weight trains)."""
    lora_rank: int = 32
    """LoRA rank (upstream: 32)."""
    lora_alpha: int = 32
    """LoRA alpha; the update is scaled by alpha / rank (upstream: alpha = rank)."""
    lora_targets: tuple[str, ...] = DIFFUSERS_LORA_TARGETS
    """Module-name suffixes that get adapters (diffusers names of q, k, v, o, ffn.0, ffn.2)."""
    base_dtype: str = "float32"
    """Dtype of the frozen DiT weights in LoRA mode (``bfloat16`` on GPU); trainable weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass (diffusers gradient checkpointing)."""
    text_max_length: int = 512
    """Prompt length the text encoder pads to, as the Wan pipeline does at inference."""


@dataclass
class DataConfig:
    """The training set and its latent cache."""

    dataset: str = "data/train"
    """Folder holding ``metadata.json`` (upstream MicroSim format: ``id``, ``video``, ``prompt``)."""
    buckets: tuple[tuple[int, int, int], ...] = ((81, 480, 832),)
    """``(frames, height, width)`` buckets; each clip goes to the closest aspect ratio whose frame count fits."""
    bucket_area: int | None = None
    """Derive the buckets' shapes from the data instead (``training.dataset.derive_buckets``): each clip's aspect
    ratio at about this many pixels (e.g. ``399360`` = 480 x 832), sides multiples of ``bucket_multiple``, the 8
    commonest shapes, each with the frame counts of ``buckets``."""
    bucket_multiple: int = 16
    """Derived bucket sides are multiples of this: the VAE's spatial factor times the DiT's patch (Wan2.1: 8 x 2;
    Wan2.2 TI2V's 16x VAE: 32)."""
    cache_dir: str | None = None
    """Where VAE latents and text embeddings are cached (default ``<output_dir>/cache``)."""
    cache_batch_size: int = 1
    """Clips per VAE encode while caching (same bucket only). Small clips encode about twice as fast per
    clip in batches of 8 on CPU; keep 1 for 480p x 81-frame clips, whose encode alone fills a GPU."""
    repeat: int = 1
    """How many times the metadata is repeated per epoch (upstream ``--dataset_repeat``)."""
    repeat_by: dict[str, dict[str, int]] = field(default_factory=dict)
    """Repeats per metadata value, e.g. ``{"process": {"blood_flow": 3}}``: a clip whose ``process``
    is ``blood_flow`` appears 3 times (times ``repeat``) per epoch; other clips once. Oversamples rare or
    hard classes."""
    frame_windows: str = "head"
    """Which frames of a clip longer than its bucket become samples: ``head`` (the first F, upstream), ``chunk``
    (consecutive non-overlapping windows of F), ``slide`` (windows every ``window_stride`` frames) or ``uniform``
    (``windows_per_clip`` windows spread evenly from the first frame to the last). Each window is its own sample
    with its own cached latents, so a long recording gives several."""
    window_stride: int | None = None
    """``slide``: frames between window starts (default: half the bucket's frames)."""
    windows_per_clip: int = 4
    """``uniform``: windows per clip; ``chunk`` and ``slide``: the most windows taken from one clip."""
    datasets: dict[str, int] = field(default_factory=dict)
    """Further training sets (folders with ``metadata.json``) and their weights: each clip of a set of weight ``w``
    is drawn ``w`` times per epoch (times ``repeat`` and ``repeat_by``), e.g. ``{"data/curated": 3}`` mixes a small
    curated set at three times its size into ``dataset`` (weight 1)."""
    validation_dataset: str | None = None
    """Held-out clips (a folder with ``metadata.json``, cached like the training set) whose loss at the fixed noise
    levels ``TrainConfig.validation_sigmas`` is logged every ``validation_loss_every`` steps."""
    caption_dropout: float = 0.1
    """Probability of training a sample on the empty prompt, which CFG needs at inference."""
    num_workers: int = 0
    """DataLoader workers reading cached latents."""


@dataclass
class ObjectiveConfig:
    """Flow matching as Wan: x_t = (1 - s) x0 + s e, the DiT predicts e - x0 at timestep 1000 s."""

    flow_shift: float = 5.0
    """Shift of the sigma schedule, s' = shift s / (1 + (shift - 1) s) (upstream and Wan 480p: 5.0)."""
    timestep_sampling: str = "uniform"
    """``uniform`` over the 1000 shifted training timesteps (upstream) or ``logit_normal`` (SD3)."""
    logit_mean: float = 0.0
    """Mean of the normal under the sigmoid for ``logit_normal``."""
    logit_std: float = 1.0
    """Std of the normal under the sigmoid for ``logit_normal``."""
    loss_weighting: str = "auto"
    """``bell``: upstream's Gaussian-in-timestep weights exp(-2 (t/1000 - 0.5)^2), shifted to 0 at the
    minimum and normalised to mean 1 over the schedule; ``none``: plain MSE; ``auto``: ``bell`` under
    ``uniform`` sampling (upstream), ``none`` under ``logit_normal``, which already favours the middle noise
    levels (bell on top would count them twice)."""
    timestep_range: tuple[float, float] = (0.0, 1.0)
    """Noise levels (sigma, 1 = pure noise) samples are trained at, e.g. ``(0.875, 1.0)`` for the high-noise expert
    of Wan2.2 A14B (boundary 0.875) and ``(0.0, 0.875)`` for the low-noise one. ``uniform`` draws among the
    schedule's sigmas in the range; ``logit_normal`` is rescaled into it."""

    @property
    def weighting(self) -> str:
        """``loss_weighting`` with ``auto`` resolved."""
        if self.loss_weighting != "auto":
            return self.loss_weighting
        return "none" if self.timestep_sampling == "logit_normal" else "bell"


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (upstream: AdamW, constant LR, wd 0.01)."""

    lr: float = 1e-4
    """Peak learning rate (upstream: 1e-4 for LoRA, 1e-5 for full fine-tunes)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: str = "constant"
    """diffusers scheduler name: ``constant``, ``cosine``, ``linear``, ... (with warmup), or
    ``warmup_stable_decay``: linear warmup, constant, then linear decay to 0 over the last ``decay_steps``."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    decay_steps: int = 0
    """``warmup_stable_decay`` only: final steps of linear decay. Until they start the schedule equals
    ``constant_with_warmup``, so a constant-rate run can be finished by a decay from its checkpoint."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""


@dataclass
class TrainConfig:
    """A full training run."""

    name: str = "run"
    """Run name (used in logs and exported metadata)."""
    output_dir: str = "outputs/run"
    """Checkpoints, logs, validation videos and exports go here."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model section."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data section."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Objective section."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer section."""
    seed: int = 42
    """Seed of weights init, data order, noise, timesteps and caption dropout (per rank)."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    batch_size: int = 1
    """Clips per micro-batch per process (upstream: 1)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    mixed_precision: str = "no"
    """accelerate mixed precision: ``no`` or ``bf16`` (fp32 master weights, bf16 autocast)."""
    ema_decay: float | None = None
    """Keep an EMA of the trainable weights with this decay (exported instead of the raw weights)."""
    checkpoint_every: int = 500
    """Save a resumable checkpoint (plus service-loadable export) every N steps."""
    keep_checkpoints: int | None = 3
    """Keep only the newest N checkpoints (None keeps all)."""
    resume: str = "auto"
    """``auto`` (latest checkpoint in ``output_dir``), ``none``, or a checkpoint folder."""
    log_every: int = 1
    """Log loss to TensorBoard and CSV every N steps."""
    validation_every: int | None = None
    """Render the validation prompts every N steps (None: only at the end, if prompts are set)."""
    validation_loss_every: int | None = None
    """Measure the held-out loss (``data.validation_dataset``) before training, every N steps and at the end (None:
    never): ``val/loss`` and ``val/loss_<sigma>`` in the trackers and ``val_loss.csv``; the ranks split the clips."""
    validation_sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    """Noise levels of the held-out loss, each with noise fixed per clip, so the numbers compare across steps."""
    validation_prompts: tuple[str, ...] = ()
    """Fixed prompts rendered as validation videos."""
    validation_steps: int = 50
    """Sampling steps for validation (upstream inference: 50)."""
    validation_guidance: float = 5.0
    """CFG scale for validation (upstream: 5.0)."""
    validation_shape: tuple[int, int, int] = (81, 480, 832)
    """``(frames, height, width)`` of validation videos (upstream: 81 x 480 x 832)."""
    validation_timeout: float = 1800.0
    """Seconds the validation renders may take: past them every rank stops rendering (together) and training goes
    on, so a slow render never stalls the ranks at a barrier."""
    validation_fps: int = 16
    """Frame rate of the saved validation videos."""
    write_upstream: bool = False
    """Also write each checkpoint in the upstream MicroVerse format (``step-N.safetensors``)."""
    export_every: int | None = None
    """Checkpoints at multiples of this step also hold a service-loadable ``export/`` (None: every checkpoint; the
    final export is always written). A 14B full fine-tune's export is 28 GB in bf16."""
    export_dtype: str = "bfloat16"
    """Dtype of the exported weights (``bfloat16``: half the size of fp32, what the service runs on GPU; ``float32``
    to keep the master weights exactly). Checkpoints keep fp32 training state either way."""
    write_comfyui: bool = False
    """LoRA runs: also write each export as ``comfyui_lora.safetensors`` in the kohya / musubi-tuner layout that
    ComfyUI's LoRA loader (and diffusers) read for Wan."""
    trackers: tuple[str, ...] = ("tensorboard",)
    """accelerate trackers the metrics go to: ``tensorboard`` (``<output_dir>/logs``), ``wandb`` (needs ``wandb``
    installed and logged in; the run is named ``name``), ``mlflow``, ... or none (``[]``); ``loss.csv`` always."""


def debug_config() -> TrainConfig:
    """Tiny CPU-sized run: a few seconds of training on a tiny Wan pipeline (``microverse.tools.tiny``)."""
    return TrainConfig(
        name="debug",
        output_dir="outputs/debug",
        model=ModelConfig(pretrained="outputs/tiny-wan", lora_rank=4, lora_alpha=4),
        data=DataConfig(dataset="data/debug", buckets=((9, 32, 32),)),
        objective=ObjectiveConfig(flow_shift=3.0),
        optim=OptimConfig(lr=1e-3),
        max_steps=20,
        checkpoint_every=10,
        validation_prompts=("cells dividing",),
        validation_steps=2,
        validation_shape=(9, 32, 32),
    )


def lora_1_3b_config() -> TrainConfig:
    """Upstream LoRA recipe for Wan2.1-T2V-1.3B at 480x832x81 (rank 32, lr 1e-4, bf16)."""
    return TrainConfig(
        name="lora-1.3b",
        output_dir="outputs/lora-1.3b",
        model=ModelConfig(base_dtype="bfloat16", gradient_checkpointing=True),
        mixed_precision="bf16",
        max_steps=5000,
        checkpoint_every=500,
        validation_every=500,
    )


def full_1_3b_config() -> TrainConfig:
    """Upstream full fine-tune recipe for Wan2.1-T2V-1.3B (lr 1e-5, fp32 master weights, bf16 autocast)."""
    return TrainConfig(
        name="full-1.3b",
        output_dir="outputs/full-1.3b",
        model=ModelConfig(mode="full", gradient_checkpointing=True),
        optim=OptimConfig(lr=1e-5),
        mixed_precision="bf16",
        max_steps=5000,
        checkpoint_every=500,
        validation_every=500,
    )


def lora_14b_config() -> TrainConfig:
    """LoRA on Wan2.1-T2V-14B at 480x832x81: rank 32 on a bf16 base (about 28 GB of weights), gradient checkpointing;
    DDP on 80 GB GPUs, or FSDP2 (``training/accelerate/fsdp2.yaml``) to shard the base as well."""
    return TrainConfig(
        name="lora-14b",
        output_dir="outputs/lora-14b",
        model=ModelConfig(pretrained="Wan-AI/Wan2.1-T2V-14B-Diffusers", base_dtype="bfloat16",
                          gradient_checkpointing=True),
        mixed_precision="bf16",
        max_steps=5000,
        checkpoint_every=500,
        validation_every=1000,
    )  # fmt: skip


def full_14b_config() -> TrainConfig:
    """Full fine-tune of Wan2.1-T2V-14B under FSDP2 on 8 GPUs (``training/accelerate/fsdp2.yaml``): fp32 master
    weights and AdamW state sharded 8 ways (about 28 GB per GPU), bf16 autocast, gradient checkpointing, a bf16
    export (28 GB) every 1000 steps."""
    return TrainConfig(
        name="full-14b",
        output_dir="outputs/full-14b",
        model=ModelConfig(pretrained="Wan-AI/Wan2.1-T2V-14B-Diffusers", mode="full", gradient_checkpointing=True),
        optim=OptimConfig(lr=1e-5),
        mixed_precision="bf16",
        max_steps=5000,
        checkpoint_every=500,
        export_every=1000,
        validation_every=1000,
    )


CONFIGS: dict[str, Callable[[], TrainConfig]] = {
    "debug": debug_config,
    "lora-1.3b": lora_1_3b_config,
    "full-1.3b": full_1_3b_config,
    "lora-14b": lora_14b_config,
    "full-14b": full_14b_config,
}


class ConfigError(ValueError):
    """A config file or override names an unknown field or gives a value of the wrong type."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key  # dotted path of the field (or the config spec) at fault
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnknownFieldError(ConfigError, KeyError):
    """A dotted path that names no config field (a ``KeyError`` too, as before typed validation)."""


def _field_path(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _all_paths(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted field path of a (nested) dataclass instance."""
    out = []
    for f in dataclasses.fields(obj):
        path = _field_path(prefix, f.name)
        value = getattr(obj, f.name)
        out.extend(_all_paths(value, path) if dataclasses.is_dataclass(value) else [path])
    return out


def _suggest(path: str, root: Any) -> list[str]:
    """Up to three field paths of ``root`` whose last name is close to ``path``'s, in any section."""
    by_leaf: dict[str, list[str]] = {}
    for p in _all_paths(root):
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    leaves = difflib.get_close_matches(path.rsplit(".", 1)[-1], by_leaf, n=3)
    return [p for leaf in leaves for p in by_leaf[leaf]][:3]


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter:
    return TypeAdapter(annotation, config=ConfigDict(coerce_numbers_to_str=True))


def _validate(path: str, value: Any, annotation: Any, type_name: str, raw: str | None = None) -> Any:
    """``value`` as ``annotation`` (YAML lists become the declared tuples, "5e-5" a float); an override's
    ``raw`` text is tried too when its YAML reading does not fit (``name=yes`` is the string "yes")."""
    try:
        return _adapter(annotation).validate_python(value)
    except ValidationError as exc:
        if raw is not None and raw != value:
            try:
                return _adapter(annotation).validate_python(raw)
            except ValidationError:
                pass
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        detail = f" ({where}: {problem['msg']})" if where else f" ({problem['msg']})"
        raise ConfigError(path, f"{path}: expected {type_name}, got {value!r}{detail}") from None


def _update(obj: Any, values: dict, prefix: str = "", root: Any = None) -> Any:
    """Recursively apply a dict of values to a (nested) dataclass instance, validating each against its
    field's type; ``root`` is the whole config (for suggestions)."""
    for key, value in values.items():
        _set(obj, key, value, _field_path(prefix, key), obj if root is None else root)
    return obj


def _section(obj: Any, key: str, path: str, root: Any) -> Any:
    """The nested dataclass ``obj.key``; :class:`ConfigError` naming ``path`` when there is no such field."""
    fields = [f.name for f in dataclasses.fields(obj)]
    if key not in fields:
        close = _suggest(path, root)
        hint = f"did you mean {' or '.join(close)}?" if close else f"{type(obj).__name__} has {', '.join(fields)}"
        raise UnknownFieldError(path, f"unknown config field {path}; {hint}")
    return getattr(obj, key)


def _set(obj: Any, key: str, value: Any, path: str, root: Any, raw: str | None = None) -> None:
    """Set field ``key`` of ``obj`` (``path`` in the whole config ``root``) to ``value`` validated against its type
    (a section takes a dict of its fields); ``raw`` is an override's text (see :func:`_validate`)."""
    current = _section(obj, key, path, root)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(path, f"{path} is a section, not a value: set its fields, e.g. {path}.<field>=...")
        _update(current, value, path, root)
        return
    annotation = typing.get_type_hints(type(obj))[key]
    type_name = next(str(f.type) for f in dataclasses.fields(obj) if f.name == key)
    setattr(obj, key, _validate(path, value, annotation, type_name, raw))


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain-dict form (lists instead of tuples), as written to YAML."""
    return yaml.safe_load(yaml.safe_dump(_listify(dataclasses.asdict(cfg))))


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Config by registered name or YAML path (``base: NAME`` in the YAML starts from a registered
    config), then ``section.field=value`` overrides (see :func:`apply_overrides`). Unknown fields and values
    of the wrong type raise :class:`ConfigError` naming the field."""
    if spec in CONFIGS:
        cfg = CONFIGS[spec]()
    else:
        path = Path(spec)
        if not path.is_file():
            close = difflib.get_close_matches(spec, CONFIGS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(spec, f"{spec!r} is neither a registered config ({', '.join(CONFIGS)}) nor a YAML "
                                    f"file{hint}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(spec, f"{spec}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(values, dict):
            raise ConfigError(spec, f"{spec}: expected a mapping of config sections, got {type(values).__name__}")
        base = values.pop("base", None)
        if base is not None and base not in CONFIGS:
            raise ConfigError("base", f"{spec}: unknown base config {base!r}; registered: {', '.join(CONFIGS)}")
        cfg = CONFIGS[base]() if base else TrainConfig()
        _update(cfg, values)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Apply ``section.field=value`` overrides to ``cfg``: the value is read as YAML and validated against the
    field's type (``optim.lr=5e-5`` is the float 5e-05, ``data.buckets=[[9, 32, 32]]`` a tuple of tuples)."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(item, f"expected KEY=VALUE (e.g. optim.lr=1e-4), got {item!r}")
        *parents, leaf = path.strip().split(".")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        obj, prefix = cfg, ""
        for parent in parents:
            prefix = _field_path(prefix, parent)
            obj = _section(obj, parent, prefix, cfg)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(prefix, f"{prefix} is a value, not a section")
        _set(obj, leaf, value, _field_path(prefix, leaf), cfg, text.strip())
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (loadable by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
