"""Service settings: one typed object read from ``MICROVERSE_*`` environment variables.

Every field is also a ``microverse serve`` flag (``--max-batch-size 8`` sets
``MICROVERSE_MAX_BATCH_SIZE=8``), so the CLI and the environment never disagree.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

AttentionBackend = Literal["auto", "native", "cudnn", "flash", "flash3", "sage", "xformers"]
Quantization = Literal["none", "int8wo", "fp8"]
Offload = Literal["none", "model", "sequential"]
Preset = Literal["exact", "fast", "distilled"]
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""What a named adapter (``MICROVERSE_LORAS``) may be called."""
LORA_SLOT = re.compile(r"^lora_\d+$")
"""The names the always-on LoRAs of ``MICROVERSE_LORA`` get (``lora_0``, ...): not free for named adapters."""


def default_cache_dir() -> Path:
    """``$MICROVERSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/microverse``, else ``~/.cache/microverse``."""
    if os.environ.get("MICROVERSE_CACHE_DIR"):
        return Path(os.environ["MICROVERSE_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "microverse"


class Settings(BaseSettings):
    """Everything the service, the engine and the CLI can be configured with."""

    model_config = SettingsConfigDict(
        env_prefix="MICROVERSE_", extra="ignore", validate_default=True, use_attribute_docstrings=True
    )

    model: str | None = None
    """Base checkpoint: a diffusers-format folder or a Hugging Face id. Empty: the embedded default."""
    lora: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """LoRA files or folders applied to every request (comma-separated in the environment), in any Wan layout:
    diffusers/PEFT, original Wan, ComfyUI, LightX2V, kohya/musubi, upstream MicroVerse."""
    lora_scale: float = 1.0
    """Strength applied to every LoRA of ``lora``."""
    loras: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """Named adapters a request may pick with its ``lora`` field (or as its OpenAI ``model``):
    ``name=path,name=path`` (names: letters, digits, ``._-``). All stay loaded; switching never reloads the base."""
    transformer: str | None = None
    """Full fine-tuned DiT replacing the base one: a diffusers transformer folder or one safetensors file in
    original Wan keys (Wan2.2 A14B: the high-noise expert)."""
    transformer_2: str | None = None
    """Wan2.2 A14B only: full fine-tune of the low-noise expert (``transformer_2``), in the same forms."""
    model_name: str | None = None
    """Name reported in ``/info`` and in OpenAI ``model`` fields; defaults to the source's name."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to run: ``auto`` picks CUDA when available."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Transformer and text-encoder dtype; ``auto`` is bfloat16 on CUDA, float32 on CPU."""
    attention_backend: AttentionBackend = "auto"
    """Attention kernel; ``auto`` picks the fastest available and logs why. An unavailable explicit choice fails
    at start."""
    quantization: Quantization = "none"
    """torchao weight quantization of the transformer through diffusers' ``TorchAoConfig``."""
    compile: bool = False
    """Regional ``torch.compile`` of the transformer blocks."""
    offload: Offload = "none"
    """CPU offload: ``model`` (whole components) or ``sequential`` (layer by layer, least memory)."""
    vae_tiling: bool = False
    """Decode the VAE in tiles to bound memory at large sizes."""
    context_parallel: int = Field(1, ge=1)
    """GPUs that share each request: above 1, the serving process spawns that many ranks on this machine and
    diffusers' context parallelism (Ulysses/ring attention) splits every video's tokens between them. Needs that
    many visible GPUs and no ``offload`` (on CPU: gloo ranks, for tests)."""
    preset: Preset = "exact"
    """Speed preset: ``exact`` keeps the math (kernel choice, text-embedding cache, bf16 VAE decode);
    ``fast`` adds lossy levers (fewer UniPC steps, first-block step cache, CFG truncation); ``distilled`` runs the
    sampling a distilled checkpoint or adapter declares (steps, guidance, sampler, shift). Requests may override it."""
    vae_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """VAE decode dtype; ``auto`` is bfloat16 on CUDA (PSNR vs float32 reported by ``microverse bench``), float32
    on CPU."""
    prompt_cache_size: int = Field(64, ge=0)
    """Text embeddings kept for repeated prompts (least recently used evicted); 0 disables the cache."""
    fast_step_ratio: float = Field(0.4, gt=0, le=1)
    """``fast``: fraction of the requested steps actually run, with the UniPC solver."""
    fast_cfg_cutoff: float = Field(0.6, gt=0, le=1)
    """``fast``: fraction of the steps run with classifier-free guidance; later steps skip the unconditional forward."""
    fast_cache_threshold: float = Field(0.08, ge=0)
    """``fast``: first-block cache threshold (relative change of the first block's residual below which the
    other blocks are skipped); 0 disables the step cache."""
    max_batch_size: int = Field(4, ge=1, le=64)
    """Most requests run together in one engine call."""
    max_batch_wait_ms: int = Field(0, ge=0, le=60_000)
    """How long the oldest request may wait for compatible ones to join its batch. 0: none; requests
    that arrive while the engine is busy are still batched together on the next call."""
    max_pixels: int = Field(480 * 832, ge=256)
    """Largest height x width accepted."""
    max_frames: int = Field(81, ge=1)
    """Largest num_frames accepted."""
    max_steps: int = Field(100, ge=1)
    """Largest num_inference_steps accepted."""
    max_queue: int = Field(64, ge=1)
    """Most jobs waiting or running; beyond it new requests get 429 with Retry-After."""
    max_active_per_key: int = Field(16, ge=1)
    """Most jobs the API key's holders (without a key: all callers together) may have waiting or running at once."""
    request_timeout_s: float = Field(900.0, gt=0)
    """How long ``POST /generate`` waits for its video before answering 504 (the job carries on)."""
    storage_dir: Path = Field(default_factory=lambda: default_cache_dir() / "storage")
    """Where the job database and finished videos live."""
    job_retention_hours: float = Field(24.0, gt=0)
    """Finished jobs and their files are deleted this long after completion."""
    max_attempts: int = Field(2, ge=1)
    """Times a job is started before an interruption (crash) marks it failed."""
    storage_url: str | None = None
    """fsspec URL of the store of finished videos and request images, shared by every replica (``s3://bucket/prefix``,
    ``gs://...``); unset: ``storage_dir``. Credentials and endpoint come from the usual environment
    (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3``, ...) or fsspec's ``FSSPEC_S3_*`` variables."""
    storage_redirect: bool = False
    """Answer a video download from ``storage_url`` with a redirect to a presigned URL (valid 5 minutes) instead of
    streaming it through the replica."""
    database_url: SecretStr | None = None
    """PostgreSQL URL of a job store shared by several replicas (``postgresql://user:pass@host:5432/db``); unset: the
    embedded SQLite database in ``storage_dir`` (one replica). Its schema is migrated (Alembic) at start."""
    lease_s: float = Field(30.0, ge=1)
    """PostgreSQL job store: how long a replica's claim on a running batch lasts without a heartbeat (renewed every
    third of it). A replica that dies loses its jobs to the others this long after its last heartbeat."""
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """This replica's name in job leases and logs (default: host name and process id)."""
    storage_retry_s: float = Field(30.0, ge=0)
    """How long a finished video keeps being retried while the storage dir cannot take it (a full disk) before its
    job fails with ``storage_error``. Job-state writes to the database are retried for as long as it takes."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of the service's own log lines (engine calls, completed jobs, lease take-overs) on the server's
    output."""
    redact_prompts: bool = False
    """Log a hash and length instead of the prompt text of each queued job."""
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Browser origins allowed to call the API (comma-separated); empty: CORS off."""
    api_key: SecretStr | None = None
    """If set, every route but the probes (``/livez``, ``/readyz``, ``/healthz``) and the ``/ui`` page needs
    ``Authorization: Bearer <key>``, BentoML's ``/metrics``, ``/docs.json`` and ``/schema.json`` included, and jobs
    are scoped to the key. Unset: all callers are one anonymous tenant (the ``Authorization`` header is ignored):
    every job is visible to every caller and ``MICROVERSE_MAX_ACTIVE_PER_KEY`` caps them all together."""

    @property
    def reference_store(self) -> str:
        """Where request images are stored: ``storage_url`` (every replica reads it) or ``storage_dir``."""
        return self.storage_url or str(self.storage_dir)

    @field_validator("lora", "cors_origins", mode="before")
    @classmethod
    def _split_lora(cls, v):
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v or []

    @field_validator("loras", mode="before")
    @classmethod
    def _split_loras(cls, v):
        if isinstance(v, str):
            pairs = [p.strip() for p in v.split(",") if p.strip()]
            bad = [p for p in pairs if "=" not in p]
            if bad:
                raise ValueError(f"expected name=path pairs separated by commas, got {bad[0]!r}")
            v = dict(p.split("=", 1) for p in pairs)
        for name in v or {}:
            if not ADAPTER_NAME.match(name) or LORA_SLOT.match(name):
                raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not lora_<n>)")
        return {k.strip(): str(p).strip() for k, p in (v or {}).items()}

    @field_validator("model", "transformer", "transformer_2", "model_name", "api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    def to_env(self) -> dict[str, str]:
        """The ``MICROVERSE_*`` variables that reproduce these settings in another process."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, list):
                value = ",".join(value)
            elif isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"MICROVERSE_{name.upper()}"] = str(value)
        if self.api_key is not None:
            env["MICROVERSE_API_KEY"] = self.api_key.get_secret_value()
        return env
