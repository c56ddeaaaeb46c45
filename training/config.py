"""Training configs as code (with a debug size that runs on CPU), loadable from YAML too.

``load_config("debug")`` returns a registered config, ``load_config("run.yaml")`` reads a YAML file
whose sections mirror :class:`TrainConfig`, and ``overrides`` (``["optim.lr=1e-4", ...]``) patch any
field by its dotted path.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    loss_weighting: str = "bell"
    """``bell``: upstream's Gaussian-in-timestep weights exp(-2 (t/1000 - 0.5)^2), shifted to 0 at the
    minimum and normalised to mean 1 over the schedule; ``none``: plain MSE."""


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
    validation_prompts: tuple[str, ...] = ()
    """Fixed prompts rendered as validation videos."""
    validation_steps: int = 50
    """Sampling steps for validation (upstream inference: 50)."""
    validation_guidance: float = 5.0
    """CFG scale for validation (upstream: 5.0)."""
    validation_shape: tuple[int, int, int] = (81, 480, 832)
    """``(frames, height, width)`` of validation videos (upstream: 81 x 480 x 832)."""
    validation_fps: int = 16
    """Frame rate of the saved validation videos."""
    write_upstream: bool = False
    """Also write each checkpoint in the upstream MicroVerse format (``step-N.safetensors``)."""


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


CONFIGS: dict[str, Callable[[], TrainConfig]] = {
    "debug": debug_config,
    "lora-1.3b": lora_1_3b_config,
    "full-1.3b": full_1_3b_config,
}


def _coerce(value: Any, annotation: str) -> Any:
    """Turn YAML lists into the tuples the dataclasses declare."""
    if isinstance(value, list) and annotation.startswith("tuple"):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def _update(obj: Any, values: dict) -> Any:
    """Recursively apply a dict of values to a (nested) dataclass instance."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            raise KeyError(f"unknown config field {type(obj).__name__}.{key}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _update(current, value)
        else:
            setattr(obj, key, _coerce(value, str(fields[key].type)))
    return obj


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
    config), then ``section.field=value`` overrides (values parsed as YAML)."""
    if spec in CONFIGS:
        cfg = CONFIGS[spec]()
    else:
        values = yaml.safe_load(Path(spec).read_text()) or {}
        cfg = CONFIGS[values.pop("base")]() if "base" in values else TrainConfig()
        _update(cfg, values)
    for item in overrides:
        path, _, raw = item.partition("=")
        *parents, leaf = path.strip().split(".")
        nested: dict = {leaf: yaml.safe_load(raw)}
        for parent in reversed(parents):
            nested = {parent: nested}
        _update(cfg, nested)
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (loadable by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
