"""Two real replicas (``bentoml serve`` processes) on one PostgreSQL and one S3-protocol store (moto's server).

Twelve jobs are created round-robin and each is polled and downloaded through the *other* replica; both replicas run
batches. Then one replica is killed with SIGKILL while it holds a batch: every job still ends completed, none is
lost, none is generated to completion twice (the replicas' logs name the jobs of each finished engine run), and the
takeover time (from the kill to the survivor's claim of the dead replica's jobs) is printed. The replicas run with
``MICROVERSE_LEASE_S=3`` (default 30).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import httpx
import psycopg

from tests.conftest import Server, wait_completed

LEASE_S = 3.0
JOB = {"prompt": "cells dividing", "size": "64x64", "seconds": "1", "num_inference_steps": 40}


def _create(url: str) -> str:
    r = httpx.post(f"{url}/v1/videos", json=JOB, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _batches(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(r"^microverse_batch_size_count (\S+)$", metrics, re.M).group(1))


def _finished_runs(*logs: Path) -> Counter:
    """Engine runs that finished generating, per job id, from the replicas' logs (``engine finished [ids]``)."""
    lines = [line for log in logs for line in re.findall(r"engine finished \[(.*?)\]", log.read_text())]
    return Counter(m for line in lines for m in re.findall(r"video_[0-9a-f]{32}", line))


def _leased_by(database_url: str, replica: str) -> list[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT id FROM jobs WHERE status='in_progress' AND lease_owner=%s", (replica,))
        return [r[0] for r in rows.fetchall()]


def test_two_replicas_share_the_queue_and_survive_a_kill(tmp_path, tiny_model_dir, database_url, moto_s3, capsys):
    env = {"MICROVERSE_MODEL": str(tiny_model_dir), "MICROVERSE_DATABASE_URL": database_url,
           "MICROVERSE_STORAGE_URL": f"s3://{moto_s3.bucket}/replicas-{time.time_ns()}",
           "MICROVERSE_LEASE_S": str(LEASE_S), "MICROVERSE_MAX_BATCH_SIZE": "2", "MICROVERSE_MAX_QUEUE": "64",
           "MICROVERSE_CACHE_DIR": str(tmp_path / "cache"), **moto_s3.env}  # fmt: skip
    replicas = {name: Server({**env, "MICROVERSE_REPLICA_ID": name, "MICROVERSE_STORAGE_DIR": str(tmp_path / name)},
                             tmp_path / f"{name}.log") for name in ("r1", "r2")}  # fmt: skip
    try:
        for server in replicas.values():
            server.start(timeout=240)
        r1, r2 = replicas["r1"].url, replicas["r2"].url
        urls = [r1, r2]

        # 12 jobs round-robin, each polled and downloaded through the other replica.
        ids = [_create(urls[i % 2]) for i in range(12)]
        for i, vid in enumerate(ids):
            other = urls[(i + 1) % 2]
            assert wait_completed(other, vid)["status"] == "completed"
            video = httpx.get(f"{other}/v1/videos/{vid}/content", timeout=60)
            assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        batches = {name: _batches(s.url) for name, s in replicas.items()}
        assert all(n > 0 for n in batches.values()), batches  # both replicas ran batches

        # 12 more; kill r1 (SIGKILL, its workers too) while it holds a batch.
        more = [_create(urls[i % 2]) for i in range(12)]
        deadline = time.time() + 120
        while not (held := _leased_by(database_url, "r1")) and time.time() < deadline:
            time.sleep(0.05)
        assert held, "r1 never held a batch"
        replicas["r1"].kill9()
        killed_at = time.time()
        results = {vid: wait_completed(r2, vid) for vid in more}
        with psycopg.connect(database_url, autocommit=True) as conn:
            taken = conn.execute("SELECT id, started_at, completed_at, attempts FROM jobs WHERE id = ANY(%s)",
                                 (held,)).fetchall()  # fmt: skip
    finally:
        for server in replicas.values():
            server.stop()

    every = ids + more
    lost = [vid for vid in more if results[vid]["status"] != "completed"]
    runs = _finished_runs(*(tmp_path / f"{n}.log" for n in replicas))
    twice = [vid for vid in every if runs[vid] > 1]
    takeover = min(started for _, started, _, _ in taken) - killed_at
    finished = max(done for _, _, done, _ in taken) - killed_at
    with capsys.disabled():
        print(f"\n2 replicas, {len(every)} jobs ({len(held)} held by r1 at the kill): lost {len(lost)}, completed "
              f"twice {len(twice)}; r2 claimed r1's jobs {takeover:.1f} s after the kill (lease {LEASE_S:g} s) and "
              f"finished them {finished:.1f} s after it; batches before the kill {batches}")
    assert not lost and not twice
    assert all(runs[vid] == 1 for vid in every)  # every job generated to completion exactly once
    assert all(attempts == 2 for _, _, _, attempts in taken)  # r1's jobs were re-run once, by r2
    # The lease lapses, the survivor's heartbeat re-queues the jobs within a beat, and its worker claims them once
    # its own running batch is done.
    assert 0 < takeover < LEASE_S + 15
