"""Resumable store of judgements and generation jobs (SQLite, one commit per record).

A judgement is keyed by video SHA-256, task index, dimension, rubric hash, judge model,
judge protocol version (column ``prompt_version``, :attr:`~evaluation.judge.JudgeProtocol.version`)
and repeat number, so a re-run after a kill repeats no judge call whose answer was received,
and a changed protocol, rubric, model or video is judged afresh.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import asdict
from pathlib import Path

from .judge import Judgement

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    video_sha256 TEXT NOT NULL,
    task_index INTEGER NOT NULL,
    dimension TEXT NOT NULL,
    rubric_hash TEXT NOT NULL,
    judge_model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    repeat INTEGER NOT NULL,
    judgement TEXT NOT NULL,
    created REAL NOT NULL DEFAULT (julianday('now')),
    PRIMARY KEY (video_sha256, task_index, dimension, rubric_hash, judge_model, prompt_version, repeat)
);
CREATE TABLE IF NOT EXISTS jobs (
    task_index INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL
);
"""


class JudgementCache:
    """Thread-safe SQLite cache; every write is committed at once (safe against kill -9)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def get(
        self,
        video_sha256: str,
        task_index: int,
        dimension: str,
        rubric_hash: str,
        judge_model: str,
        prompt_version: str,
        repeat: int = 0,
    ) -> Judgement | None:
        """The stored judgement for this key, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT judgement FROM judgements WHERE video_sha256=? AND task_index=? AND dimension=?"
                " AND rubric_hash=? AND judge_model=? AND prompt_version=? AND repeat=?",
                (video_sha256, task_index, dimension, rubric_hash, judge_model, prompt_version, repeat),
            ).fetchone()
        return Judgement(**json.loads(row[0])) if row else None

    def put(
        self,
        video_sha256: str,
        task_index: int,
        dimension: str,
        rubric_hash: str,
        judge_model: str,
        prompt_version: str,
        judgement: Judgement,
        repeat: int = 0,
    ) -> None:
        """Store a judgement (replacing any with the same key)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgements (video_sha256, task_index, dimension, rubric_hash, judge_model,"
                " prompt_version, repeat, judgement) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    video_sha256,
                    task_index,
                    dimension,
                    rubric_hash,
                    judge_model,
                    prompt_version,
                    repeat,
                    json.dumps(asdict(judgement), ensure_ascii=False),
                ),
            )

    def count(self) -> int:
        """Number of stored judgements."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def job_id(self, task_index: int) -> str | None:
        """The generation job started for a task, if any."""
        with self._lock:
            row = self._db.execute("SELECT job_id FROM jobs WHERE task_index=?", (task_index,)).fetchone()
        return row[0] if row else None

    def set_job_id(self, task_index: int, job_id: str | None) -> None:
        """Remember (or forget, with None) the generation job of a task."""
        with self._lock:
            if job_id is None:
                self._db.execute("DELETE FROM jobs WHERE task_index=?", (task_index,))
            else:
                self._db.execute("INSERT OR REPLACE INTO jobs (task_index, job_id) VALUES (?, ?)", (task_index, job_id))

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
