"""Durable job store: SQLite (WAL, synchronous=FULL) plus finished videos as files on disk.

A job is committed before the request that created it is answered. After a crash, :meth:`JobStore.recover`
puts interrupted jobs back in the queue (or fails them, with the reason, once they have used up their
attempts), so no job is ever lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from media.video import write_atomic

from .schemas import GenerationSpec

logger = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^video_[0-9a-f]{32}$")
ACTIVE = ("queued", "in_progress")
DB_FILE = "jobs.sqlite3"
APPLICATION_ID = 0x4D564A42
"""SQLite ``application_id`` stamped on the job database ("MVJB"), so another program's file is told apart."""
RECOVERY_COMMAND = "microverse jobs recover --storage-dir <MICROVERSE_STORAGE_DIR>"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    spec TEXT NOT NULL,
    batch_key TEXT NOT NULL,
    model TEXT NOT NULL,
    owner TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    expires_at REAL,
    error_code TEXT,
    error_message TEXT,
    timings TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs(status, created_at);
"""
COLUMNS = ("id", "kind", "status", "progress", "spec", "batch_key", "model", "owner", "attempts", "created_at",
           "started_at", "completed_at", "expires_at", "error_code", "error_message", "timings")
"""The columns of ``jobs``, in order (a table with others is not ours)."""


class StorageError(Exception):
    """The job store could not save a job."""

    def __init__(self, message: str, full: bool) -> None:
        super().__init__(message)
        self.full = full
        """True when the cause is a full disk or quota (ENOSPC, EDQUOT, SQLite's SQLITE_FULL)."""


def is_full(exc: BaseException) -> bool:
    """Whether a storage exception means that no space is left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL  # the primary of an extended code


class DatabaseUnusable(Exception):
    """The job database cannot be used as it is: unreadable, corrupt, another program's, or emptied while the
    videos of its jobs remain. The service then starts without it (not ready, the reason in ``/info``) and never
    replaces it with an empty one; :data:`RECOVERY_COMMAND` moves it aside and salvages what it can."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the job database is unusable: {reason}; recover with `{RECOVERY_COMMAND}`")
        self.reason = reason


def is_corruption(exc: BaseException) -> bool:
    """Whether an SQLite error means a damaged or foreign file (rather than a busy or full one)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return isinstance(exc, sqlite3.DatabaseError) and code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def job_files(videos_dir: Path) -> list[Path]:
    """The job files (videos, thumbnails) in a videos folder."""
    return sorted(p for p in videos_dir.glob("video_*") if JOB_ID_RE.match(p.name.split(".")[0]))


def open_database(root: Path, check_lost: bool = True) -> sqlite3.Connection:
    """Open (or create) the job database in ``root`` after checking it; :class:`DatabaseUnusable` when the file
    is unreadable, fails SQLite's ``quick_check``, belongs to another program, or (with ``check_lost``) is missing
    or empty while job files remain (its records were lost: starting empty would silently drop them)."""
    path = root / DB_FILE
    if check_lost and (not path.exists() or path.stat().st_size == 0):
        files = job_files(root / "videos")
        if files:
            state = "is empty (0 bytes)" if path.exists() else "is missing"
            raise DatabaseUnusable(f"{DB_FILE} {state} but {len(files)} job file(s) remain in videos/")
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        _check(db)
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise DatabaseUnusable(f"{DB_FILE} cannot be read ({exc})") from exc
    except DatabaseUnusable:
        db.close()
        raise
    db.row_factory = sqlite3.Row
    return db


def _check(db: sqlite3.Connection) -> None:
    """SQLite's ``quick_check`` and the file's identity (ours, or an empty file)."""
    problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        raise DatabaseUnusable(f"{DB_FILE} failed SQLite's integrity check: {'; '.join(problems[:3])}")
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    columns = tuple(r[1] for r in db.execute("PRAGMA table_info(jobs)"))
    ours = app_id == APPLICATION_ID or (app_id == 0 and tables <= {"jobs"})  # 0: written before the stamp
    if not ours or (tables and columns != COLUMNS):
        raise DatabaseUnusable(f"{DB_FILE} is not a MicroVerse job database (application_id {app_id:#x}, "
                               f"tables {sorted(tables)})")


@dataclass
class Job:
    """One generation job as stored."""

    id: str
    kind: str
    status: str
    progress: int
    spec: GenerationSpec
    model: str
    owner: str | None
    attempts: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    expires_at: float | None
    error_code: str | None
    error_message: str | None
    timings: dict


def job_from_row(row) -> Job:
    """A :class:`Job` from a database row (a mapping of :data:`COLUMNS`); ``ValueError`` or ``TypeError`` when its
    stored spec or timings cannot be read."""
    spec = GenerationSpec(**json.loads(row["spec"]))
    timings = json.loads(row["timings"]) if row["timings"] else {}
    return Job(
        id=row["id"], kind=row["kind"], status=row["status"], progress=row["progress"], spec=spec,
        model=row["model"], owner=row["owner"], attempts=row["attempts"], created_at=row["created_at"],
        started_at=row["started_at"], completed_at=row["completed_at"], expires_at=row["expires_at"],
        error_code=row["error_code"], error_message=row["error_message"], timings=timings,
    )  # fmt: skip


class JobFiles:
    """Where a job's files live: ``<root>/videos/<job id>.mp4`` and ``.webp`` on local disk (one replica, or a volume
    every replica mounts), or the same names under ``videos/`` of an fsspec URL (``s3://bucket/prefix``: a store
    every replica shares; credentials and endpoint from the usual environment, e.g. ``AWS_ENDPOINT_URL_S3``, or
    fsspec's ``FSSPEC_S3_*`` variables)."""

    def __init__(self, root: Path, url: str | None = None):
        self.root = Path(root)
        self.videos_dir = self.root / "videos"
        self.videos_dir.mkdir(parents=True, exist_ok=True)
        self.url = url
        self._fs, self._prefix = None, ""
        if url:
            import fsspec

            self._fs, self._prefix = fsspec.core.url_to_fs(url, use_listings_cache=False)  # other replicas write
            self._prefix = self._prefix.rstrip("/")

    @property
    def remote(self) -> bool:
        """Whether the files are in an fsspec store (not a local folder)."""
        return self._fs is not None

    def _key(self, job_id: str, suffix: str) -> str:
        if not JOB_ID_RE.match(job_id) or suffix not in (".mp4", ".webp"):
            raise ValueError(f"invalid job file {job_id!r}{suffix!r}")
        return f"{self._prefix}/videos/{job_id}{suffix}"

    def write_file(self, job_id: str, suffix: str, data: bytes) -> None:
        """Store a finished job's ``.mp4`` or ``.webp`` (whole or not at all: a temporary file renamed into place, or
        one object PUT)."""
        if self.remote:
            self._fs.pipe_file(self._key(job_id, suffix), data)
        else:
            write_atomic(self.video_path(job_id).with_suffix(suffix), data)

    def has_file(self, job_id: str, suffix: str) -> bool:
        if self.remote:
            return self._fs.exists(self._key(job_id, suffix))
        return self.video_path(job_id).with_suffix(suffix).is_file()

    def read_file(self, job_id: str, suffix: str) -> bytes:
        if self.remote:
            return self._fs.cat_file(self._key(job_id, suffix))
        return self.video_path(job_id).with_suffix(suffix).read_bytes()

    def stream_file(self, job_id: str, suffix: str, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The file in chunks (a download streams from the store without holding the whole video)."""
        with self._fs.open(self._key(job_id, suffix), "rb") as f:
            while data := f.read(chunk):
                yield data

    def signed_url(self, job_id: str, suffix: str, expires_s: int = 300) -> str:
        """A presigned URL of the file (object stores that sign, e.g. S3); ``NotImplementedError`` otherwise."""
        return self._fs.sign(self._key(job_id, suffix), expiration=expires_s)

    def video_path(self, job_id: str) -> Path:
        """Where a job's mp4 lives (ids are validated, never free text)."""
        if not JOB_ID_RE.match(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.videos_dir / f"{job_id}.mp4"

    def thumb_path(self, job_id: str) -> Path:
        return self.video_path(job_id).with_suffix(".webp")

    def delete_files(self, job_id: str) -> None:
        """Remove a job's video, thumbnail and any partial file."""
        if self.remote:
            for suffix in (".mp4", ".webp"):
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(self._key(job_id, suffix))
            return
        for p in (self.video_path(job_id), self.thumb_path(job_id)):
            p.unlink(missing_ok=True)
            p.with_suffix(p.suffix + ".part").unlink(missing_ok=True)


class JobStore(JobFiles):
    """Thread-safe job table (embedded SQLite, one replica) and the per-job file layout under ``root``. Opening it
    checks the database (:func:`open_database`). :class:`microverse.pgjobs.PostgresJobStore` has the same
    interface for several replicas."""

    def __init__(self, root: Path, retention_s: float, max_attempts: int = 2, storage_url: str | None = None):
        super().__init__(root, storage_url)
        self.retention_s = retention_s
        self.max_attempts = max_attempts
        self._lock = threading.RLock()
        self._db = open_database(self.root)

    # -- rows --------------------------------------------------------------------------------
    def _row_to_job(self, row: sqlite3.Row) -> Job | None:
        try:
            return job_from_row(row)
        except (TypeError, ValueError) as exc:
            logger.error("job %s has a corrupted record (%s); marking it failed", row["id"], exc)
            self._execute(
                "UPDATE jobs SET status='failed', error_code='corrupted_record', error_message=?, "
                "spec='{}', completed_at=? WHERE id=?",
                (f"the stored job record could not be read: {exc}", time.time(), row["id"]),
            )
            return None

    def _execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def create(self, spec: GenerationSpec, model: str, kind: str = "api", owner: str | None = None) -> Job:
        """Insert a queued job; it is durable when this returns. Raises :class:`StorageError` when it cannot be
        written (nothing is stored then)."""
        job_id = f"video_{uuid.uuid4().hex}"
        now = time.time()
        try:
            self._execute(
                "INSERT INTO jobs (id, kind, status, spec, batch_key, model, owner, created_at) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, kind, json.dumps(asdict(spec)), json.dumps(spec.batch_key), model, owner, now),
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"could not store job {job_id}: {exc}", full=is_full(exc)) from exc
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID_RE.match(job_id):
            return None
        row = self._execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return self._row_to_job(row) if row else None

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc",
             owner: str | None = None) -> list[Job]:
        """Jobs by creation time; ``after`` is the id of the last job of the previous page."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        where, params = ["kind='api'"], []
        if owner is not None:
            where.append("owner=?")
            params.append(owner)
        if after:
            ref = self._execute("SELECT created_at, id FROM jobs WHERE id=?", (after,)).fetchone()
            if ref is None:
                raise KeyError(after)
            where.append(f"(created_at {op} ? OR (created_at = ? AND id {op} ?))")
            params += [ref["created_at"], ref["created_at"], ref["id"]]
        rows = self._execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at {direction}, id {direction} LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [j for j in (self._row_to_job(r) for r in rows) if j is not None]

    def count(self, statuses: tuple[str, ...] = ACTIVE, owner: str | None = None) -> int:
        """Jobs in ``statuses`` (of ``owner`` when given; '' counts anonymous jobs)."""
        marks = ",".join("?" * len(statuses))
        sql, params = f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", list(statuses)
        if owner is not None:
            sql += " AND IFNULL(owner, '')=?"
            params.append(owner)
        return self._execute(sql, tuple(params)).fetchone()[0]

    def oldest_queued(self) -> Job | None:
        while True:
            row = self._execute("SELECT * FROM jobs WHERE status='queued' ORDER BY created_at, id LIMIT 1").fetchone()
            if row is None:
                return None
            job = self._row_to_job(row)
            if job is not None:
                return job

    def count_compatible(self, batch_key: tuple) -> int:
        return self._execute("SELECT COUNT(*) FROM jobs WHERE status='queued' AND batch_key=?",
                             (json.dumps(batch_key),)).fetchone()[0]

    def claim_batch(self, batch_key: tuple, max_size: int) -> list[Job]:
        """Atomically move up to ``max_size`` oldest compatible queued jobs to in_progress."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [r[0] for r in self._db.execute(
                    "SELECT id FROM jobs WHERE status='queued' AND batch_key=? ORDER BY created_at, id LIMIT ?",
                    (json.dumps(batch_key), max_size)).fetchall()]
                now = time.time()
                for job_id in ids:
                    self._db.execute(
                        "UPDATE jobs SET status='in_progress', attempts=attempts+1, started_at=?, progress=0"
                        " WHERE id=?",
                        (now, job_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [j for j in (self.get(i) for i in ids) if j is not None]

    def set_progress(self, ids: list[str], progress: int) -> None:
        marks = ",".join("?" * len(ids))
        self._execute(f"UPDATE jobs SET progress=? WHERE status='in_progress' AND id IN ({marks})", (progress, *ids))

    def complete(self, job_id: str, timings: dict) -> bool:
        """Mark completed (the files must already be in place); False if the job was deleted meanwhile."""
        now = time.time()
        cur = self._execute(
            "UPDATE jobs SET status='completed', progress=100, completed_at=?, expires_at=?, timings=? "
            "WHERE id=? AND status='in_progress'",
            (now, now + self.retention_s, json.dumps(timings), job_id))
        return cur.rowcount == 1

    def fail(self, job_id: str, code: str, message: str) -> None:
        now = time.time()
        self._execute(
            "UPDATE jobs SET status='failed', error_code=?, error_message=?, completed_at=?, expires_at=? "
            "WHERE id=? AND status IN ('queued', 'in_progress')",
            (code, message, now, now + self.retention_s, job_id))

    def requeue(self, job_id: str) -> None:
        """Put an in-progress job back in the queue (e.g. graceful shutdown, retry smaller)."""
        self._execute("UPDATE jobs SET status='queued', progress=0, attempts=MAX(attempts-1, 0) "
                      "WHERE id=? AND status='in_progress'", (job_id,))

    def delete(self, job_id: str) -> Job | None:
        """Remove a job and its files; returns it as it was (None if unknown)."""
        job = self.get(job_id)
        if job is None:
            return None
        self._execute("DELETE FROM jobs WHERE id=?", (job_id,))
        self.delete_files(job_id)
        return job

    def recover(self) -> dict[str, int]:
        """After a restart: re-queue interrupted jobs, or fail those out of attempts. Returns counts."""
        now = time.time()
        with self._lock:
            failed = self._db.execute(
                "UPDATE jobs SET status='failed', error_code='interrupted', error_message=?, completed_at=?, "
                "expires_at=? WHERE status='in_progress' AND attempts>=?",
                (f"the server stopped while this job was running, {self.max_attempts} time(s); not retried again",
                 now, now + self.retention_s, self.max_attempts)).rowcount
            requeued = self._db.execute(
                "UPDATE jobs SET status='queued', progress=0 WHERE status='in_progress'").rowcount
        for row in self._execute("SELECT * FROM jobs WHERE status IN ('queued','in_progress')").fetchall():
            for p in (self.video_path(row["id"]), self.thumb_path(row["id"])):
                p.with_suffix(p.suffix + ".part").unlink(missing_ok=True)
            job = self._row_to_job(row)
            if job is not None and row["batch_key"] != json.dumps(job.spec.batch_key):  # queued by another version
                self._execute("UPDATE jobs SET batch_key=? WHERE id=?", (json.dumps(job.spec.batch_key), job.id))
        if failed or requeued:
            logger.warning("recovered after restart: %d job(s) re-queued, %d failed", requeued, failed)
        return {"requeued": requeued, "failed": failed}

    def expire(self, now: float | None = None) -> int:
        """Delete finished jobs past their expiry, with their files. Returns how many."""
        now = time.time() if now is None else now
        ids = [r[0] for r in self._execute(
            "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at < ?", (now,)).fetchall()]
        for job_id in ids:
            self._execute("DELETE FROM jobs WHERE id=?", (job_id,))
            self.delete_files(job_id)
        return len(ids)

    def heartbeat(self, ids: list[str]) -> set[str]:
        """Of ``ids`` (this replica's running jobs), those still in progress; a deleted one is to be cancelled.
        (One replica holds no leases: nothing else can take its jobs.)"""
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self._execute(f"SELECT id FROM jobs WHERE status='in_progress' AND id IN ({marks})", tuple(ids))
        return {r[0] for r in rows.fetchall()}

    def reclaim_expired(self) -> dict[str, int]:
        """Jobs of replicas whose leases lapsed: none with one replica (its restart recovers them)."""
        return {"requeued": 0, "failed": 0}

    def close(self) -> None:
        with self._lock:
            self._db.close()
