"""``microverse jobs check`` / ``recover``: what an operator runs when the job database is unusable.

Recovery never deletes the damaged file: it moves it (and its ``-wal`` / ``-shm``) aside as
``jobs.sqlite3.broken-<time>``, copies every job row SQLite can still read into a new database, and reports the
job files no row refers to (deleted only with ``delete_orphans``). Run it with the service stopped; jobs that
were running are re-queued at the next start as after any crash.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import COLUMNS, DB_FILE, JOB_ID_RE, DatabaseUnusable, job_files, open_database

logger = logging.getLogger(__name__)

MAX_PROBED_ROWS = 1_000_000
"""Most row ids probed one by one when a damaged table cannot be read in one pass."""


@dataclass
class Recovery:
    """What :func:`recover` did."""

    problem: str | None
    """Why the database was unusable (None: it was usable and is left as it is)."""
    moved_to: Path | None = None
    """Where the unusable database now lies (kept for forensics)."""
    salvaged: int = 0
    """Job rows copied into the new database."""
    orphans: list[Path] = field(default_factory=list)
    """Job files that no row refers to."""
    orphans_deleted: bool = False
    """Whether those files were deleted."""


def check_database(root: Path) -> str | None:
    """Why the job database in ``root`` is unusable, or None when the service can open it."""
    try:
        open_database(Path(root)).close()
    except DatabaseUnusable as exc:
        return exc.reason
    return None


def recover(root: Path, delete_orphans: bool = False) -> Recovery:
    """Make the job database in ``root`` usable again, keeping every row that can be read (module docstring)."""
    root = Path(root)
    report = Recovery(problem=check_database(root))
    if report.problem is not None:
        report.moved_to = _move_aside(root)
        rows = salvage(report.moved_to) if report.moved_to is not None else []
        db = open_database(root, check_lost=False)
        with db:
            db.executemany(f"INSERT OR IGNORE INTO jobs VALUES ({','.join('?' * len(COLUMNS))})", rows)
        report.salvaged = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        db.close()
        logger.info("job database recovered: %d row(s) salvaged; the damaged file is %s", report.salvaged,
                    report.moved_to)
    report.orphans = _orphans(root)
    if delete_orphans:
        for path in report.orphans:
            path.unlink(missing_ok=True)
        report.orphans_deleted = True
    return report


def _move_aside(root: Path) -> Path | None:
    """Rename the database and its journal files to ``*.broken-<time>``; None when there is no database file."""
    path = root / DB_FILE
    if not path.exists():
        return None
    target = root / f"{DB_FILE}.broken-{time.strftime('%Y%m%dT%H%M%S')}"
    for suffix in ("-wal", "-shm", ""):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.rename(target.with_name(target.name + suffix))
    return target


def salvage(path: Path) -> list[tuple]:
    """The rows of a job table SQLite can still read (none from a file that is not one), read from a copy so the
    damaged file stays as it was."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / DB_FILE
        for suffix in ("", "-wal"):
            src = path.with_name(path.name + suffix)
            if src.exists():
                shutil.copyfile(src, copy.with_name(copy.name + suffix))
        db = sqlite3.connect(copy)
        try:
            return _readable_rows(db)
        except sqlite3.DatabaseError as exc:
            logger.warning("nothing could be read from %s: %s", path, exc)
            return []
        finally:
            db.close()


def _readable_rows(db: sqlite3.Connection) -> list[tuple]:
    if tuple(r[1] for r in db.execute("PRAGMA table_info(jobs)")) != COLUMNS:
        return []  # not our table: nothing of it belongs in the new database
    try:
        return db.execute("SELECT * FROM jobs").fetchall()
    except sqlite3.DatabaseError:  # a damaged page: read around it, one row id at a time
        pass
    try:
        top = db.execute("SELECT MAX(rowid) FROM jobs").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        top = MAX_PROBED_ROWS
    rows = []
    for rowid in range(1, min(top, MAX_PROBED_ROWS) + 1):
        try:
            row = db.execute("SELECT * FROM jobs WHERE rowid=?", (rowid,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None and isinstance(row[0], str) and JOB_ID_RE.match(row[0]):
            rows.append(row)
    return rows


def _orphans(root: Path) -> list[Path]:
    """Job files whose job is not in the (usable) database."""
    db = open_database(root, check_lost=False)
    try:
        known = {r[0] for r in db.execute("SELECT id FROM jobs")}
    finally:
        db.close()
    return [p for p in job_files(root / "videos") if p.name.split(".")[0] not in known]
