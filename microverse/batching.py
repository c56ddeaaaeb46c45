"""The batch worker: groups compatible queued jobs into one engine call and finishes them.

Compatible means equal :attr:`GenerationSpec.batch_key` (size, frames, steps, guidance, negative
prompt); different keys are never mixed. Each request keeps its own seed and generator, so its video
does not depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from media.video import encode_mp4, thumbnail

from .engine import BatchResult, GenerationCancelled, VideoEngine
from .jobs import Job, JobStore
from .metrics import ServiceMetrics

logger = logging.getLogger(__name__)

EXPIRY_SWEEP_S = 60.0
WAITER_POLL_S = 0.5
"""How often the status of jobs waited on here but run by another replica is checked."""
STORAGE_ERRORS = (OSError, sqlite3.Error)
"""What a failing storage dir or job database raises (a full disk, a busy or unreadable database)."""
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 5.0
"""First and longest wait between two tries of a storage write (the wait doubles in between)."""
T = TypeVar("T")


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class BatchWorker:
    """Background thread that drains the job queue, batch by batch."""

    def __init__(self, store: JobStore, engine: VideoEngine, metrics: ServiceMetrics,
                 max_batch_size: int, max_batch_wait_s: float, storage_retry_s: float = 30.0,
                 heartbeat_s: float = 10.0):
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.storage_retry_s = storage_retry_s
        """How long a finished video's files are retried on a failing storage dir before its job fails."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancelled: set[str] = set()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._waiters_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="microverse-batch-worker", daemon=True)
        self.heartbeat_s = heartbeat_s
        """How often the running batch's leases are renewed (a third of the lease) and lapsed ones reclaimed."""
        self._running: list[str] = []
        self._heartbeat = threading.Thread(target=self._beat, name="microverse-lease-heartbeat", daemon=True)
        self._last_sweep = 0.0
        self.mean_call_s: float | None = None
        """Moving average of engine-call seconds (for Retry-After)."""

    # -- control -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._heartbeat.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown: the running batch stops at its next step and goes back to the queue."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._heartbeat.join(timeout)

    def notify(self) -> None:
        """A job was queued."""
        self._set_queue_depth()
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
            except Exception:  # nothing is claimed yet (the claim is one transaction): try again shortly
                logger.exception("batch worker error")
                self._stop.wait(0.5)
                continue
            self._set_queue_depth()
            if batch:
                self._run_claimed(batch)

    def _set_queue_depth(self) -> None:
        """Update the queue-depth gauge (skipped while the database cannot be read: it is only a gauge)."""
        try:
            self.metrics.queue_depth.set(self.store.count(("queued",)))
        except STORAGE_ERRORS as exc:
            logger.warning("queue depth not updated: %s", exc)

    def _gather(self, first: Job) -> None:
        """Wait up to max_batch_wait after the oldest job was queued for compatible ones to join."""
        deadline = first.created_at + self.max_batch_wait_s
        while (not self._stop.is_set() and time.time() < deadline
               and self.store.count_compatible(first.spec.batch_key) < self.max_batch_size):
            self._wake.wait(max(0.0, deadline - time.time()))
            self._wake.clear()

    def _beat(self) -> None:
        """Every ``WAITER_POLL_S``: wake the waiters of jobs another replica finished; every ``heartbeat_s``: renew the
        leases of the running batch and re-queue the jobs of lapsed leases (a dead replica's), also while this
        replica is busy."""
        last = 0.0
        while not self._stop.wait(min(WAITER_POLL_S, self.heartbeat_s)):
            try:
                self._resolve_finished_elsewhere()
                if time.monotonic() - last >= self.heartbeat_s:
                    last = time.monotonic()
                    self._renew_leases()
            except STORAGE_ERRORS as exc:
                logger.warning("lease heartbeat failed (retried in %g s): %s", self.heartbeat_s, exc)

    def _renew_leases(self) -> None:
        """A job whose lease is gone (deleted on any replica, or taken over after a lapse) is cancelled here; the
        batch stops at its next step once all of its jobs are."""
        ids = list(self._running)
        held = self.store.heartbeat(ids)
        if sum(self.store.reclaim_expired().values()):
            self._wake.set()
        for job_id in set(ids) - held:
            if job_id in self._running and job_id not in self._cancelled:
                logger.warning("%s was deleted or taken over by another replica; stopping it", job_id)
                self._cancelled.add(job_id)

    def _resolve_finished_elsewhere(self) -> None:
        """Waiters (``POST /generate``) of jobs this replica is not running: resolved once the job is finished or gone,
        wherever it ran (with several replicas, any of them may take it)."""
        with self._waiters_lock:
            waited = [i for i in self._waiters if i not in self._running]
        for job_id in waited:
            job = self.store.get(job_id)
            if job is None or job.status in ("completed", "failed"):
                self._resolve(job_id)

    def _sweep(self) -> None:
        if time.time() - self._last_sweep > EXPIRY_SWEEP_S:
            self._last_sweep = time.time()
            n = self.store.expire()
            if n:
                logger.info("expired %d job(s) and their files", n)

    def _run_claimed(self, batch: list[Job]) -> None:
        """Run a claimed batch. Whatever happens, each job leaves ``in_progress`` (completed, failed or back in
        the queue) and its waiters are woken: a job is never left running without this worker."""
        outer = self._running  # a batch split after out-of-memory keeps the whole batch's leases renewed
        self._running = outer or [j.id for j in batch]
        try:
            self._run_batch(batch)
        except Exception as exc:
            logger.exception("batch %s failed outside the engine", [j.id for j in batch])
            reason = f"the server could not finish this job: {type(exc).__name__}: {exc}"
            for job in batch:
                self._settle(f"failing {job.id}", lambda j=job: self.store.fail(j.id, "internal_error", reason))
        finally:
            self._running = outer
            self._finish([j.id for j in batch])

    def _run_batch(self, batch: list[Job]) -> None:
        ids = [j.id for j in batch]
        logger.info("engine call: %d job(s) %s", len(batch), ids)
        steps_seen = 0
        progress_lost = False

        def on_step(done: int, total: int) -> None:
            nonlocal steps_seen, progress_lost
            steps_seen = done
            self.metrics.steps_total.inc()
            try:
                self.store.set_progress(ids, int(99 * done / total))
            except STORAGE_ERRORS as exc:  # progress is advisory: a storage hiccup must not stop the generation
                if not progress_lost:
                    logger.warning("progress of %s not saved (the generation goes on): %s", ids, exc)
                progress_lost = True

        def should_cancel() -> bool:
            return self._stop.is_set() or all(i in self._cancelled for i in ids)

        t0 = time.perf_counter()
        try:
            result = self.engine.generate([j.spec for j in batch], on_step=on_step, should_cancel=should_cancel)
        except GenerationCancelled:
            if self._stop.is_set():
                logger.info("shutting down: %s back to the queue after %d steps", ids, steps_seen)
                for job_id in ids:
                    self._settle(f"re-queueing {job_id}", lambda j=job_id: self.store.requeue(j))
            else:
                logger.info("batch %s cancelled after %d steps", ids, steps_seen)
            self._finish(ids)
            return
        except Exception as exc:
            if _is_oom(exc) and len(batch) > 1:
                logger.warning("out of memory with a batch of %d; running its jobs one by one", len(batch))
                for job in batch:
                    self._run_claimed([job])
                return
            hint = (" (out of memory: try a smaller size, fewer frames, or MICROVERSE_OFFLOAD=model)"
                    if _is_oom(exc) else "")
            logger.exception("engine call failed for %s", ids)
            reason = f"{type(exc).__name__}: {exc}{hint}"
            for job in batch:
                self._settle(f"failing {job.id}", lambda j=job: self.store.fail(j.id, "generation_failed", reason))
                self.metrics.jobs_total.labels("failed").inc()
            self._finish(ids)
            return
        elapsed = time.perf_counter() - t0
        logger.info("engine finished %s in %.2f s", ids, elapsed)
        self.mean_call_s = elapsed if self.mean_call_s is None else 0.8 * self.mean_call_s + 0.2 * elapsed
        self.metrics.generation_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(batch))
        for job, frames in zip(batch, result.videos, strict=True):
            if job.id not in self._cancelled:
                self._store_video(job, frames, result, len(batch))
        self._finish(ids)

    def _store_video(self, job: Job, frames, result: BatchResult, batch_size: int) -> None:
        """Write a finished job's files, then mark it completed (or failed when the files cannot be written
        within ``storage_retry_s``)."""
        t_enc = time.perf_counter()
        video, thumb = encode_mp4(frames, job.spec.fps), thumbnail(frames)

        def write() -> None:
            self.store.write_file(job.id, ".mp4", video)
            self.store.write_file(job.id, ".webp", thumb)

        try:
            self._retry(f"storing the video of {job.id}", write, self.storage_retry_s)
        except OSError as exc:
            logger.error("could not store the video of %s: %s", job.id, exc)
            reason = f"could not write the video to the storage dir: {exc}"
            self._settle(f"failing {job.id}", lambda: self.store.fail(job.id, "storage_error", reason))
            self.metrics.jobs_total.labels("failed").inc()
            return
        timings = {"batch_size": batch_size, "denoise_s": round(result.denoise_seconds, 4),
                   "decode_s": round(result.decode_seconds, 4), "encode_s": round(time.perf_counter() - t_enc, 4),
                   "queue_s": round((job.started_at or job.created_at) - job.created_at, 4)}
        if self._settle(f"completing {job.id}", lambda: self.store.complete(job.id, timings)):
            self.metrics.jobs_total.labels("completed").inc()
            logger.info("completed %s", job.id)
        elif not self._stop.is_set() and self.store.get(job.id) is None:  # deleted while running
            self.store.delete_files(job.id)

    # -- storage retries -------------------------------------------------------------------------
    def _retry(self, what: str, write: Callable[[], T], limit_s: float | None = None) -> T:
        """``write()``, retried with backoff while storage fails (a full disk, a busy database); re-raises once
        ``limit_s`` has passed or the worker is stopping."""
        deadline = None if limit_s is None else time.monotonic() + limit_s
        delay = RETRY_FIRST_S
        while True:
            try:
                return write()
            except STORAGE_ERRORS as exc:
                if self._stop.is_set() or (deadline is not None and time.monotonic() + delay > deadline):
                    raise
                logger.warning("%s: storage error (%s); retrying in %.1f s", what, exc, delay)
                self._stop.wait(delay)
                delay = min(2 * delay, RETRY_MAX_S)

    def _settle(self, what: str, write: Callable[[], T]) -> T | None:
        """A job-state write (complete, fail, re-queue), retried until storage takes it. Only a shutdown ends
        the retries; the job is then still ``in_progress`` in the database, and the next start's recovery
        re-queues it."""
        try:
            return self._retry(what, write)
        except STORAGE_ERRORS as exc:
            logger.error("%s: storage still failing at shutdown (%s); the next start recovers the job", what, exc)
            return None

    def _finish(self, ids: list[str]) -> None:
        for i in ids:
            self._cancelled.discard(i)
            self._resolve(i)
