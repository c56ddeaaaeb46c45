"""The one submission path of ``/generate`` and ``/v1/videos`` (so the two batch together): backpressure,
a durable job, a wake-up of the batch worker."""

from __future__ import annotations

import hashlib
import logging

from .errors import APIError
from .jobs import Job, StorageError
from .runtime import Runtime
from .schemas import GenerationSpec

logger = logging.getLogger(__name__)


def submit(rt: Runtime, spec: GenerationSpec, kind: str, owner: str | None) -> Job:
    """Queue a validated request durably, or answer 429 when the queue is full (507 or 503 when the job cannot be
    stored: :func:`storage_failure`)."""
    if rt.store.count() >= rt.settings.max_queue:
        raise APIError(429, f"the queue is full ({rt.settings.max_queue} jobs); retry later",
                       None, "queue_full", {"Retry-After": str(retry_after_s(rt))})
    if rt.store.count(owner=owner or "") >= rt.settings.max_active_per_key:
        raise APIError(429, f"this API key already has {rt.settings.max_active_per_key} jobs waiting or running",
                       None, "too_many_active_jobs", {"Retry-After": str(retry_after_s(rt))})
    try:
        job = rt.store.create(spec, rt.engine.model.name, kind=kind, owner=owner)
    except StorageError as exc:
        raise storage_failure(exc) from exc
    rt.worker.notify()
    logger.info("queued %s (%s, %dx%dx%d, %d steps, seed %d): %s", job.id, kind, spec.width, spec.height,
                spec.num_frames, spec.num_inference_steps, spec.seed,
                prompt_for_log(spec.prompt, rt.settings.redact_prompts))
    return job


def storage_failure(exc: StorageError) -> APIError:
    """The answer to a job that could not be stored: 507 when the disk is full (as a job whose video cannot be
    written), 503 for any other storage fault. The details go to the log, never to the caller."""
    logger.error("could not queue a job: %s", exc)
    if exc.full:
        return APIError(507, "the server's storage is full; the job was not queued", None, "storage_error")
    return APIError(503, "the server's storage failed; the job was not queued, retry later", None, "storage_error",
                    {"Retry-After": "10"})


def prompt_for_log(prompt: str, redact: bool) -> str:
    """The prompt as logged: quoted (first 200 characters), or only its hash and length when redacting."""
    if redact:
        return f"<prompt redacted: sha256 {hashlib.sha256(prompt.encode()).hexdigest()[:12]}, {len(prompt)} chars>"
    return repr(prompt[:200])


def retry_after_s(rt: Runtime) -> int:
    """A rough wait: the recent engine-call time x queued batches, at least 1 s."""
    per_call = rt.worker.mean_call_s or 5.0
    batches = rt.store.count() / max(1, rt.settings.max_batch_size)
    return max(1, int(per_call * batches + 0.999))
