"""The batch worker: groups compatible queued jobs into one engine call and finishes them.

Compatible means equal :attr:`GenerationSpec.batch_key` (size, frames, steps, guidance, negative
prompt); different keys are never mixed. Each request keeps its own seed and generator, so its video
does not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from media.video import encode_mp4, thumbnail, write_atomic

from .engine import GenerationCancelled, VideoEngine
from .jobs import Job, JobStore
from .metrics import ServiceMetrics

logger = logging.getLogger(__name__)

EXPIRY_SWEEP_S = 60.0


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class BatchWorker:
    """Background thread that drains the job queue, batch by batch."""

    def __init__(self, store: JobStore, engine: VideoEngine, metrics: ServiceMetrics,
                 max_batch_size: int, max_batch_wait_s: float):
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancelled: set[str] = set()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._waiters_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="microverse-batch-worker", daemon=True)
        self._last_sweep = 0.0
        self.mean_call_s: float | None = None
        """Moving average of engine-call seconds (for Retry-After)."""

    # -- control -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown: the running batch stops at its next step and goes back to the queue."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def notify(self) -> None:
        """A job was queued."""
        self.metrics.queue_depth.set(self.store.count(("queued",)))
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Stop a running job between steps (its row is already deleted by the caller)."""
        self._cancelled.add(job_id)
        self._resolve(job_id)

    def wait_future(self, job_id: str) -> asyncio.Future:
        """A future, on the running loop, resolved when the job leaves the queue for good."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._waiters_lock:
            self._waiters.setdefault(job_id, []).append((loop, fut))
        job = self.store.get(job_id)
        if job is None or job.status in ("completed", "failed"):
            self._resolve(job_id)
        return fut

    def _resolve(self, job_id: str) -> None:
        with self._waiters_lock:
            waiters = self._waiters.pop(job_id, [])
        for loop, fut in waiters:
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))

    # -- loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sweep()
                first = self.store.oldest_queued()
                if first is None:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                self._gather(first)
                batch = self.store.claim_batch(first.spec.batch_key, self.max_batch_size)
                self.metrics.queue_depth.set(self.store.count(("queued",)))
                if batch:
                    self._run_batch(batch)
            except Exception:  # the worker must survive anything a batch throws
                logger.exception("batch worker error")
                time.sleep(0.5)

    def _gather(self, first: Job) -> None:
        """Wait up to max_batch_wait after the oldest job was queued for compatible ones to join."""
        deadline = first.created_at + self.max_batch_wait_s
        while (not self._stop.is_set() and time.time() < deadline
               and self.store.count_compatible(first.spec.batch_key) < self.max_batch_size):
            self._wake.wait(max(0.0, deadline - time.time()))
            self._wake.clear()

    def _sweep(self) -> None:
        if time.time() - self._last_sweep > EXPIRY_SWEEP_S:
            self._last_sweep = time.time()
            n = self.store.expire()
            if n:
                logger.info("expired %d job(s) and their files", n)

    def _run_batch(self, batch: list[Job]) -> None:
        ids = [j.id for j in batch]
        logger.info("engine call: %d job(s) %s", len(batch), ids)
        steps_seen = 0

        def on_step(done: int, total: int) -> None:
            nonlocal steps_seen
            steps_seen = done
            self.metrics.steps_total.inc()
            self.store.set_progress(ids, int(99 * done / total))

        def should_cancel() -> bool:
            return self._stop.is_set() or all(i in self._cancelled for i in ids)

        t0 = time.perf_counter()
        try:
            result = self.engine.generate([j.spec for j in batch], on_step=on_step, should_cancel=should_cancel)
        except GenerationCancelled:
            if self._stop.is_set():
                logger.info("shutting down: %s back to the queue after %d steps", ids, steps_seen)
                for job_id in ids:
                    self.store.requeue(job_id)
            else:
                logger.info("batch %s cancelled after %d steps", ids, steps_seen)
            self._finish(ids)
            return
        except Exception as exc:
            if _is_oom(exc) and len(batch) > 1:
                logger.warning("out of memory with a batch of %d; running its jobs one by one", len(batch))
                for job in batch:
                    self._run_batch([job])
                return
            hint = (" (out of memory: try a smaller size, fewer frames, or MICROVERSE_OFFLOAD=model)"
                    if _is_oom(exc) else "")
            logger.exception("engine call failed for %s", ids)
            for job in batch:
                self.store.fail(job.id, "generation_failed", f"{type(exc).__name__}: {exc}{hint}")
                self.metrics.jobs_total.labels("failed").inc()
            self._finish(ids)
            return
        elapsed = time.perf_counter() - t0
        self.mean_call_s = elapsed if self.mean_call_s is None else 0.8 * self.mean_call_s + 0.2 * elapsed
        self.metrics.generation_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(batch))
        for job, frames in zip(batch, result.videos, strict=True):
            if job.id in self._cancelled:
                continue
            t_enc = time.perf_counter()
            try:
                write_atomic(self.store.video_path(job.id), encode_mp4(frames, job.spec.fps))
                write_atomic(self.store.thumb_path(job.id), thumbnail(frames))
            except OSError as exc:
                logger.error("could not store the video of %s: %s", job.id, exc)
                self.store.fail(job.id, "storage_error", f"could not write the video to the storage dir: {exc}")
                self.metrics.jobs_total.labels("failed").inc()
                continue
            timings = {"batch_size": len(batch), "denoise_s": round(result.denoise_seconds, 4),
                       "decode_s": round(result.decode_seconds, 4),
                       "encode_s": round(time.perf_counter() - t_enc, 4),
                       "queue_s": round((job.started_at or job.created_at) - job.created_at, 4)}
            if self.store.complete(job.id, timings):
                self.metrics.jobs_total.labels("completed").inc()
            else:  # deleted while running
                self.store.delete_files(job.id)
        self._finish(ids)

    def _finish(self, ids: list[str]) -> None:
        for i in ids:
            self._cancelled.discard(i)
            self._resolve(i)
