"""The running service's objects: settings, engine, job store, batch worker and metrics."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from evaluation.judge import JudgeConfig
from evaluation.judge_api import JudgeService

from .batching import BatchWorker
from .config import Settings
from .engine import VideoEngine
from .jobs import RECOVERY_COMMAND, DatabaseUnusable, JobStore
from .metrics import ServiceMetrics
from .parallel import build_engine
from .schemas import Limits

logger = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of the packages that decide what the service computes."""
    out = {"python": platform.python_version()}
    for pkg in ("microverse", "torch", "diffusers", "transformers", "bentoml", "peft", "torchao"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def limits_of(settings: Settings, engine: VideoEngine | None = None) -> Limits:
    """The request limits the settings (and the model's positional embedding) impose."""
    max_side, adapters = 1 << 30, ()
    if engine is not None:
        pipe = engine.model.pipe
        cfg = pipe.transformer.config
        max_side = cfg.rope_max_seq_len * cfg.patch_size[1] * pipe.vae_scale_factor_spatial
        adapters = tuple(engine.model.adapters)
    return Limits(max_pixels=settings.max_pixels, max_frames=settings.max_frames, max_steps=settings.max_steps,
                  max_side=max_side, adapters=adapters)


def open_store(settings: Settings) -> JobStore:
    """The job store the settings ask for: PostgreSQL shared by the replicas (``database_url``), else the embedded
    SQLite database in ``storage_dir``. :class:`DatabaseUnusable` when it cannot be used."""
    retention_s = settings.job_retention_hours * 3600
    if settings.database_url is None:
        return JobStore(settings.storage_dir, retention_s, settings.max_attempts, settings.storage_url)
    from .pgjobs import PostgresJobStore

    return PostgresJobStore(settings.database_url.get_secret_value(), settings.storage_dir, retention_s,
                            settings.max_attempts, settings.lease_s, settings.replica_id,
                            settings.storage_url)  # fmt: skip


def _make_judge(settings: Settings) -> JudgeService | None:
    """The rubric judge behind ``/judge``, configured from ``MICROVERSE_JUDGE_*`` (None when unset)."""
    config = JudgeConfig.from_env()
    if config is None:
        return None
    logger.info("judge enabled: %s at %s", config.model, config.base_url)
    return JudgeService(config, cache_path=Path(settings.storage_dir) / "judge_cache.sqlite3")


@dataclass
class Runtime:
    """Everything a request handler needs; built once per server process."""

    settings: Settings
    """The ``MICROVERSE_*`` settings the service started with."""
    metrics: ServiceMetrics
    """The service's Prometheus metrics."""
    jobs: JobStore | None = None
    """Durable jobs (SQLite + files) shared by every route; None when the database is unusable (see ``store``)."""
    store_error: str | None = None
    """Why the job database cannot be used (checked at start, or found damaged while serving), for ``/info``."""
    engine: VideoEngine | None = None
    """The loaded model's engine; None when the model failed to load."""
    load_error: str | None = None
    """Why the model failed to load, reported by ``/info``."""
    judge: JudgeService | None = None
    """The rubric judge behind ``/judge``; None until ``MICROVERSE_JUDGE_BASE_URL`` is set."""
    worker: BatchWorker | None = field(default=None, repr=False)
    """The thread running queued jobs in batches; None without an engine or a usable job database."""
    started_at: float = field(default_factory=time.time)
    """When the service started (the ``created`` time of ``GET /v1/models``)."""

    @classmethod
    def start(cls, settings: Settings, engine: VideoEngine | None = None) -> Runtime:
        """Open the job store, load the model (unless ``engine`` is given), recover the store and start the worker.

        A model that fails to load, or a job database that is unusable, leaves the service up but not ready, with
        the reason in ``/info``; an unusable database is left as it is for ``microverse jobs recover``.
        """
        rt = cls(settings=settings, metrics=ServiceMetrics())
        try:
            rt.jobs = open_store(settings)
        except DatabaseUnusable as exc:
            rt.store_error = exc.reason
            logger.error("%s (storage dir %s); the service is up but not ready", exc, settings.storage_dir)
        if engine is None:
            try:
                engine = build_engine(settings)
            except Exception as exc:
                rt.load_error = f"{type(exc).__name__}: {exc}"
                logger.error("model failed to load; the service is up but not ready: %s", rt.load_error)
        rt.engine = engine
        rt.judge = _make_judge(settings)
        if rt.jobs is not None:
            rt.jobs.recover()
        if engine is not None and rt.jobs is not None:
            rt.worker = BatchWorker(rt.jobs, engine, rt.metrics, settings.max_batch_size,
                                    settings.max_batch_wait_ms / 1000, settings.storage_retry_s, settings.lease_s / 3)
            rt.worker.start()
            rt.worker.notify()
        return rt

    @property
    def store(self) -> JobStore:
        """The job store; :class:`DatabaseUnusable` (a 503 for requests) when its database cannot be used."""
        if self.jobs is None or self.store_error is not None:
            raise DatabaseUnusable(self.store_error or "not opened")
        return self.jobs

    def store_damaged(self, reason: str) -> None:
        """The database was found damaged while serving: stop using it (not ready; recovery is an operator's)."""
        if self.store_error is None:
            logger.error("the job database is damaged (%s); the service is not ready until `%s`", reason,
                         RECOVERY_COMMAND)
        self.store_error = f"damaged while serving: {reason}"

    @property
    def ready(self) -> bool:
        """Whether a model is loaded, the job database is usable, and requests can be served."""
        return self.engine is not None and self.load_error is None and self.store_error is None

    @property
    def limits(self) -> Limits:
        """The request limits of the settings and the loaded model."""
        return limits_of(self.settings, self.engine)

    def info(self) -> dict[str, Any]:
        """What ``/info`` reports."""
        s = self.settings
        out: dict[str, Any] = {
            "ready": self.ready,
            "load_error": self.load_error,
            "versions": versions(),
            "limits": self.limits.__dict__,
            "batching": {"max_batch_size": s.max_batch_size, "max_batch_wait_ms": s.max_batch_wait_ms,
                         "max_queue": s.max_queue},
            "job_retention_hours": s.job_retention_hours,
            "storage": {"ok": self.store_error is None, "error": self.store_error,
                        "recovery": RECOVERY_COMMAND if self.store_error else None},
            "judge": ({"model": self.judge.judge.config.model} if self.judge is not None else None),
        }
        if self.engine is None:
            return out
        m, c = self.engine.model, self.engine.choice
        tcfg = m.pipe.transformer.config
        out.update({
            "model": {"name": m.name, "source": m.source, "description": m.description, "family": m.family.name,
                      "inputs": list(m.family.inputs), "loras": m.loras,
                      "lora_scale": s.lora_scale if m.loras else None, "transformer_override": m.transformer_override,
                      "transformer_2_override": m.transformer_2_override,
                      "adapters": m.adapters},
            "adapter_switches": {"count": self.engine.adapter_switches,
                                 "mean_ms": round(1000 * self.engine.adapter_switch_seconds
                                                  / max(1, self.engine.adapter_switches), 3)},
            "architecture": {
                "family": m.family.title, "experts": m.family.experts,
                "num_layers": tcfg.num_layers, "num_attention_heads": tcfg.num_attention_heads,
                "attention_head_dim": tcfg.attention_head_dim,
                "hidden_size": tcfg.num_attention_heads * tcfg.attention_head_dim,
                "ffn_dim": tcfg.ffn_dim, "patch_size": list(tcfg.patch_size), "latent_channels": tcfg.in_channels,
                "text_dim": tcfg.text_dim,
                "parameters": sum(p.numel() for p in m.pipe.transformer.parameters()),
            },
            "defaults": m.defaults.__dict__,
            "runtime": {"device": c.device, "dtype": str(c.dtype).removeprefix("torch."),
                        "attention_backend": c.attention_backend, "attention_reason": c.attention_reason,
                        "quantization": c.quantization, "compile": c.compiled, "offload": c.offload,
                        "vae_tiling": c.vae_tiling},
        })
        return out

    def stop(self) -> None:
        """Stop the worker (re-queueing its batch), close the engine if it has a ``close`` (the context-parallel
        one stops its ranks) and close the job store."""
        if self.worker is not None:
            self.worker.stop()
        if (close := getattr(self.engine, "close", None)) is not None:
            close()
        if self.jobs is not None:
            self.jobs.close()
