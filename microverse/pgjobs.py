"""The job store on PostgreSQL, shared by every replica (``MICROVERSE_DATABASE_URL``).

Same interface as the embedded :class:`microverse.jobs.JobStore`, plus leases: a replica's batch worker claims the
oldest compatible queued jobs with ``SELECT ... FOR UPDATE SKIP LOCKED`` (two replicas never claim the same row),
and the claim is a lease (``lease_owner``, ``lease_expires_at``) its heartbeat renews every third of
``MICROVERSE_LEASE_S``. When a replica dies, the others' sweeps find its lapsed leases and put the jobs back in the
queue, counting the attempt and recording why, or fail them once ``MICROVERSE_MAX_ATTEMPTS`` is used up. A job's
completion, failure, re-queue and progress only take effect under its owner's lease, so a replica that lost a
job (taken over, or deleted by a ``DELETE`` on any replica) learns it at its next heartbeat and stops, and never
completes it a second time. Retention runs on one replica at a time (an advisory lock). The schema is versioned
with Alembic (``microverse/migrations``) and migrated at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from .jobs import JOB_ID_RE, DatabaseUnusable, Job, JobFiles, StorageError, job_from_row
from .schemas import GenerationSpec

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
RETENTION_LOCK = 0x4D56_5254  # pg advisory lock key of the retention sweep ("MVRT")


class DatabaseUnavailable(OSError):
    """PostgreSQL cannot be reached or dropped the connection (a storage error: the worker retries)."""


def sqlalchemy_url(url: str) -> str:
    """``postgresql://...`` as SQLAlchemy's psycopg 3 URL (``postgresql+psycopg://...``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        raise ValueError(f"MICROVERSE_DATABASE_URL must be a postgresql:// URL, got scheme {scheme!r}")
    return f"postgresql+psycopg://{rest}"


def migrate(url: str) -> str:
    """Bring the schema to this version's head (Alembic; concurrent starts wait on an advisory lock); returns the
    revision. :class:`DatabaseUnusable` when the database is at a revision this version does not know (a newer
    release migrated it)."""
    from alembic import command
    from alembic.config import Config
    from alembic.util.exc import CommandError

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    cfg.attributes["revision"] = None
    try:
        command.upgrade(cfg, "head")
    except CommandError as exc:
        raise DatabaseUnusable(f"the PostgreSQL job schema cannot be migrated by this version: {exc}") from exc
    return cfg.attributes["revision"]


class PostgresJobStore(JobFiles):
    """Jobs in PostgreSQL (shared by the replicas); videos in ``storage_url`` (an object store) or under ``root`` (a
    volume every replica mounts)."""

    def __init__(self, url: str, root: Path, retention_s: float, max_attempts: int = 2, lease_s: float = 30.0,
                 replica_id: str | None = None, storage_url: str | None = None):  # fmt: skip
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        super().__init__(root, storage_url)
        self.retention_s, self.max_attempts, self.lease_s = retention_s, max_attempts, lease_s
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:8]}"
        self._errors = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ConnectionTimeout)
        try:
            self.revision = migrate(url)
            self._pool = ConnectionPool(url, min_size=1, max_size=8, open=True, timeout=10,
                                        kwargs={"autocommit": True, "row_factory": dict_row})  # fmt: skip
            self._pool.wait(timeout=10)
        except (psycopg.Error, OSError) as exc:
            raise DatabaseUnusable(f"PostgreSQL cannot be used ({type(exc).__name__}: {exc})") from exc
        logger.info("job store: PostgreSQL at schema %s, replica %s, leases of %g s", self.revision,
                    self.replica_id, lease_s)  # fmt: skip

    @contextlib.contextmanager
    def _conn(self) -> Iterator:
        """A pooled connection; connection failures surface as :class:`DatabaseUnavailable` (an ``OSError``)."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except self._errors as exc:
            raise DatabaseUnavailable(f"PostgreSQL: {exc}") from exc

    def _all(self, sql: str, params: tuple = ()) -> list[dict]:
        with self._conn() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def _jobs(self, rows: list[dict]) -> list[Job]:
        out = []
        for row in rows:
            try:
                out.append(job_from_row(row))
            except (TypeError, ValueError) as exc:
                logger.error("job %s has a corrupted record (%s); marking it failed", row["id"], exc)
                self._all("UPDATE jobs SET status='failed', error_code='corrupted_record', error_message=%s, "
                          "spec='{}', completed_at=%s WHERE id=%s",
                          (f"the stored job record could not be read: {exc}", time.time(), row["id"]))  # fmt: skip
        return out

    # -- requests ------------------------------------------------------------------------------
    def create(self, spec: GenerationSpec, model: str, kind: str = "api", owner: str | None = None) -> Job:
        """Insert a queued job, durable (committed) when this returns; :class:`StorageError` when it cannot be."""
        job_id = f"video_{uuid.uuid4().hex}"
        try:
            rows = self._all(
                "INSERT INTO jobs (id, kind, status, spec, batch_key, model, owner, created_at) "
                "VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s) RETURNING *",
                (job_id, kind, json.dumps(asdict(spec)), json.dumps(spec.batch_key), model, owner, time.time()),
            )
        except DatabaseUnavailable as exc:
            raise StorageError(f"could not store job {job_id}: {exc}", full=False) from exc
        return self._jobs(rows)[0]

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID_RE.match(job_id):
            return None
        jobs = self._jobs(self._all("SELECT * FROM jobs WHERE id=%s", (job_id,)))
        return jobs[0] if jobs else None

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc",
             owner: str | None = None) -> list[Job]:  # fmt: skip
        """Jobs by creation time; ``after`` is the id of the last job of the previous page."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        where, params = ["kind='api'"], []
        if owner is not None:
            where.append("owner=%s")
            params.append(owner)
        if after:
            ref = self._all("SELECT created_at, id FROM jobs WHERE id=%s", (after,))
            if not ref:
                raise KeyError(after)
            where.append(f"(created_at, id) {op} (%s, %s)")
            params += [ref[0]["created_at"], ref[0]["id"]]
        sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at {direction}, id {direction} LIMIT %s"
        return self._jobs(self._all(sql, (*params, limit)))

    def count(self, statuses: tuple[str, ...] = ("queued", "in_progress"), owner: str | None = None) -> int:
        """Jobs in ``statuses`` over every replica (of ``owner`` when given; '' counts anonymous jobs): the queue
        limit and the per-key limits are global."""
        sql, params = "SELECT COUNT(*) AS n FROM jobs WHERE status = ANY(%s)", [list(statuses)]
        if owner is not None:
            sql += " AND COALESCE(owner, '')=%s"
            params.append(owner)
        return self._all(sql, tuple(params))[0]["n"]

    def delete(self, job_id: str) -> Job | None:
        """Remove a job and its files; the replica running it sees the row gone at its next heartbeat and stops."""
        job = self.get(job_id)
        if job is None:
            return None
        self._all("DELETE FROM jobs WHERE id=%s", (job_id,))
        self.delete_files(job_id)
        return job

    # -- the batch worker ----------------------------------------------------------------------
    def oldest_queued(self) -> Job | None:
        """The oldest queued job (a corrupted record met on the way is failed and passed over)."""
        while True:
            rows = self._all("SELECT * FROM jobs WHERE status='queued' ORDER BY created_at, id LIMIT 1")
            if not rows:
                return None
            jobs = self._jobs(rows)
            if jobs:
                return jobs[0]

    def count_compatible(self, batch_key: tuple) -> int:
        rows = self._all("SELECT COUNT(*) AS n FROM jobs WHERE status='queued' AND batch_key=%s",
                         (json.dumps(batch_key),))  # fmt: skip
        return rows[0]["n"]

    def claim_batch(self, batch_key: tuple, max_size: int) -> list[Job]:
        """Lease up to ``max_size`` oldest compatible queued jobs to this replica (rows another replica is claiming
        at the same moment are skipped, never shared)."""
        now = time.time()
        rows = self._all(
            "WITH picked AS (SELECT id FROM jobs WHERE status='queued' AND batch_key=%s "
            "ORDER BY created_at, id LIMIT %s FOR UPDATE SKIP LOCKED) "
            "UPDATE jobs SET status='in_progress', attempts=attempts+1, started_at=%s, progress=0, "
            "lease_owner=%s, lease_expires_at=%s FROM picked WHERE jobs.id=picked.id RETURNING jobs.*",
            (json.dumps(batch_key), max_size, now, self.replica_id, now + self.lease_s),
        )
        return sorted(self._jobs(rows), key=lambda j: (j.created_at, j.id))

    def heartbeat(self, ids: list[str]) -> set[str]:
        """Renew this replica's leases on ``ids``; returns those it still holds (a missing one was deleted or, after
        a lapse, taken over: stop working on it)."""
        if not ids:
            return set()
        rows = self._all("UPDATE jobs SET lease_expires_at=%s WHERE id = ANY(%s) AND status='in_progress' "
                         "AND lease_owner=%s RETURNING id", (time.time() + self.lease_s, ids, self.replica_id))
        return {r["id"] for r in rows}

    def set_progress(self, ids: list[str], progress: int) -> None:
        self._all("UPDATE jobs SET progress=%s WHERE id = ANY(%s) AND status='in_progress' AND lease_owner=%s",
                  (progress, ids, self.replica_id))  # fmt: skip

    def complete(self, job_id: str, timings: dict) -> bool:
        """Mark completed under this replica's lease; False when the job was deleted or taken over meanwhile."""
        now = time.time()
        rows = self._all(
            "UPDATE jobs SET status='completed', progress=100, completed_at=%s, expires_at=%s, timings=%s, "
            "lease_owner=NULL, lease_expires_at=NULL WHERE id=%s AND status='in_progress' AND lease_owner=%s "
            "RETURNING id",
            (now, now + self.retention_s, json.dumps(timings), job_id, self.replica_id),
        )
        return bool(rows)

    def fail(self, job_id: str, code: str, message: str) -> None:
        now = time.time()
        self._all("UPDATE jobs SET status='failed', error_code=%s, error_message=%s, completed_at=%s, expires_at=%s, "
                  "lease_owner=NULL, lease_expires_at=NULL WHERE id=%s AND (status='queued' OR "
                  "(status='in_progress' AND lease_owner=%s))",
                  (code, message, now, now + self.retention_s, job_id, self.replica_id))  # fmt: skip

    def requeue(self, job_id: str) -> None:
        """Give a running job back to the queue (graceful shutdown), its attempt not counted."""
        self._all("UPDATE jobs SET status='queued', progress=0, attempts=GREATEST(attempts-1, 0), lease_owner=NULL, "
                  "lease_expires_at=NULL WHERE id=%s AND status='in_progress' AND lease_owner=%s",
                  (job_id, self.replica_id))  # fmt: skip

    def reclaim_expired(self) -> dict[str, int]:
        """Put the jobs of lapsed leases (their replica died) back in the queue, with the reason, or fail those out
        of attempts. Any replica may run it; each row moves once."""
        now = time.time()
        failed = self._all(
            "UPDATE jobs SET status='failed', error_code='interrupted', completed_at=%s, expires_at=%s, "
            "error_message='replica ' || lease_owner || ' stopped renewing its lease while running this job, ' "
            "|| attempts || ' time(s); not retried again', lease_owner=NULL, lease_expires_at=NULL "
            "WHERE status='in_progress' AND lease_expires_at < %s AND attempts >= %s RETURNING id",
            (now, now + self.retention_s, now, self.max_attempts),
        )
        requeued = self._all(
            "UPDATE jobs SET status='queued', progress=0, error_code='requeued', "
            "error_message='replica ' || lease_owner || ' stopped renewing its lease (attempt ' || attempts || "
            "'); re-queued by ' || %s::text, lease_owner=NULL, lease_expires_at=NULL "
            "WHERE status='in_progress' AND lease_expires_at < %s RETURNING id",
            (self.replica_id, now),
        )
        if failed or requeued:
            logger.warning("lapsed leases: %d job(s) re-queued, %d failed (out of attempts)", len(requeued),
                           len(failed))  # fmt: skip
        return {"requeued": len(requeued), "failed": len(failed)}

    def recover(self) -> dict[str, int]:
        """At start: this replica's own leases from a previous life (same ``replica_id``) and every lapsed lease go
        back to the queue, and queued jobs get this version's batch key."""
        self._all("UPDATE jobs SET lease_expires_at=0 WHERE status='in_progress' AND lease_owner=%s",
                  (self.replica_id,))  # fmt: skip
        counts = self.reclaim_expired()
        for job in self._jobs(self._all("SELECT * FROM jobs WHERE status='queued'")):
            key = json.dumps(job.spec.batch_key)
            self._all("UPDATE jobs SET batch_key=%s WHERE id=%s AND batch_key<>%s", (key, job.id, key))
        return counts

    def expire(self, now: float | None = None) -> int:
        """Delete finished jobs past their expiry, with their files, on one replica at a time (advisory lock)."""
        now = time.time() if now is None else now
        with self._conn() as conn, conn.transaction():
            if not conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS got", (RETENTION_LOCK,)).fetchone()["got"]:
                return 0
            rows = conn.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at < %s RETURNING id",
                                (now,)).fetchall()  # fmt: skip
        for row in rows:
            self.delete_files(row["id"])
        return len(rows)

    def close(self) -> None:
        self._pool.close()
