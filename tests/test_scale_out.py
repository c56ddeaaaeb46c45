"""Several replicas on one PostgreSQL job store (``MICROVERSE_DATABASE_URL``): claims never shared, leases taken over
when a replica dies, cancellation and the queue limit across replicas, versioned schema, one retention sweeper.

PostgreSQL is a real server (Debian's, started by the ``postgres_server`` fixture)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from microverse.jobs import DatabaseUnusable
from microverse.pgjobs import RETENTION_LOCK, PostgresJobStore
from microverse.schemas import GenerationSpec
from tests.conftest import wait_status

SPEC = GenerationSpec(prompt="cells dividing", negative_prompt="", height=32, width=32, num_frames=5,
                      num_inference_steps=2, guidance_scale=5.0, seed=1, fps=8)  # fmt: skip


def _store(url, tmp_path, replica, **kw) -> PostgresJobStore:
    return PostgresJobStore(url, tmp_path, kw.pop("retention_s", 60), kw.pop("max_attempts", 2), replica_id=replica,
                            **kw)  # fmt: skip


def test_replicas_claiming_at_once_never_share_a_job(database_url, tmp_path):
    stores = [_store(database_url, tmp_path, f"r{i}") for i in range(4)]
    ids = {stores[0].create(SPEC, "m").id for _ in range(60)}
    claimed: dict[str, list[str]] = {s.replica_id: [] for s in stores}

    def drain(store):
        while batch := store.claim_batch(SPEC.batch_key, 3):
            claimed[store.replica_id] += [j.id for j in batch]

    threads = [threading.Thread(target=drain, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for got in claimed.values() for i in got]
    assert sorted(every) == sorted(ids)  # each job claimed exactly once
    assert sum(1 for got in claimed.values() if got) >= 2, claimed  # the replicas shared the queue
    assert all(j.status == "in_progress" and j.attempts == 1 for j in stores[1].list(limit=100, owner=None))
    for s in stores:
        s.close()


def test_a_dead_replicas_jobs_are_requeued_with_the_reason_then_failed_out_of_attempts(database_url, tmp_path):
    a, b = (_store(database_url, tmp_path, r, lease_s=1, max_attempts=2) for r in ("a", "b"))
    job = a.create(SPEC, "m")
    assert [j.id for j in a.claim_batch(SPEC.batch_key, 4)] == [job.id]
    assert a.heartbeat([job.id]) == {job.id}
    assert b.reclaim_expired() == {"requeued": 0, "failed": 0}  # the lease is alive
    time.sleep(1.2)  # a "dies": no heartbeat
    assert b.reclaim_expired() == {"requeued": 1, "failed": 0}
    queued = b.get(job.id)
    assert queued.status == "queued" and "replica a stopped renewing its lease (attempt 1)" in queued.error_message
    assert a.heartbeat([job.id]) == set() and not a.complete(job.id, {})  # a learns it lost the job; no completion
    assert [j.attempts for j in b.claim_batch(SPEC.batch_key, 4)] == [2]
    time.sleep(1.2)  # b dies too: MICROVERSE_MAX_ATTEMPTS (2) is used up
    assert a.reclaim_expired() == {"requeued": 0, "failed": 1}
    failed = a.get(job.id)
    assert failed.status == "failed" and failed.error_code == "interrupted" and "replica b" in failed.error_message
    a.close(), b.close()


def test_a_newer_schema_is_refused_and_migration_is_idempotent(database_url, tmp_path):
    first = _store(database_url, tmp_path, "a")
    assert first.revision == "0001_jobs" and _store(database_url, tmp_path, "b").revision == "0001_jobs"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num='0099_from_a_newer_release'")
    with pytest.raises(DatabaseUnusable, match="cannot be migrated by this version"):
        _store(database_url, tmp_path, "c")
    first.close()


def test_retention_runs_on_one_replica_at_a_time(database_url, tmp_path):
    store = _store(database_url, tmp_path, "a", retention_s=0)
    job = store.create(SPEC, "m")
    store.claim_batch(SPEC.batch_key, 1)
    store.video_path(job.id).write_bytes(b"mp4")
    assert store.complete(job.id, {})
    with psycopg.connect(database_url, autocommit=True) as other:  # another replica is sweeping
        other.execute("SELECT pg_advisory_lock(%s)", (RETENTION_LOCK,))
        assert store.expire(now=time.time() + 1) == 0 and store.get(job.id) is not None
        other.execute("SELECT pg_advisory_unlock(%s)", (RETENTION_LOCK,))
    assert store.expire(now=time.time() + 1) == 1
    assert store.get(job.id) is None and not store.video_path(job.id).exists()
    store.close()


def _job(client, **extra) -> str:
    body = {"prompt": "cells dividing", "size": "32x32", "seconds": "1", "num_inference_steps": 8, **extra}
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_the_queue_limit_and_cancellation_hold_across_replicas(runtime_with, database_url):
    """Two replicas on one database: the queue limit is global (429 on both), and a DELETE on one replica stops the
    job the other is running at its next heartbeat."""
    common = {"database_url": database_url, "max_queue": 3, "lease_s": 1, "max_batch_size": 1}
    clients, runtimes = {}, {}
    for name in ("a", "b"):
        clients[name], runtimes[name], _ = runtime_with({"step_s": 0.5}, replica_id=name, **common)
    a, b = clients["a"], clients["b"]
    running = _job(a)
    wait_status(a, running, ("in_progress",), timeout=30)
    queued = [_job(b), _job(a)]
    for client in (a, b):
        r = client.post("/v1/videos", json={"prompt": "cells dividing", "size": "32x32", "seconds": "1"})
        assert r.status_code == 429 and "queue is full (3 jobs)" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 1
    owner = runtimes["a"].store._all("SELECT lease_owner FROM jobs WHERE id=%s", (running,))[0]["lease_owner"]
    other = "b" if owner == "a" else "a"
    t0 = time.time()
    assert clients[other].delete(f"/v1/videos/{running}").status_code == 200  # on the replica that does not run it
    while runtimes[owner].worker._running == [running] and time.time() - t0 < 10:
        time.sleep(0.05)
    stopped_after = time.time() - t0
    assert stopped_after < 3, stopped_after  # the owner stopped within about a heartbeat (lease 1 s / 3) and a step
    assert clients[owner].get(f"/v1/videos/{running}").status_code == 404
    for vid in queued:
        assert wait_status(clients[other], vid, ("completed",), timeout=60)["status"] == "completed"


def test_videos_live_in_the_shared_object_store(runtime_with, database_url, storage_url):
    """``MICROVERSE_STORAGE_URL`` (S3 protocol, a real moto server): a video made on one replica streams from the
    other, or redirects to a presigned URL; nothing is kept on local disk; DELETE removes the objects."""
    import fsspec
    import httpx

    a, rt_a, _ = runtime_with(None, replica_id="a", database_url=database_url, storage_url=storage_url)
    b, _, _ = runtime_with(None, replica_id="b", database_url=database_url, storage_url=storage_url,
                           storage_redirect=True)  # fmt: skip
    vid = _job(a)
    wait_status(b, vid, ("completed",), timeout=60)
    streamed = a.get(f"/v1/videos/{vid}/content")
    assert streamed.status_code == 200 and streamed.content[4:8] == b"ftyp"
    assert streamed.headers["content-type"] == "video/mp4" and vid in streamed.headers["content-disposition"]
    redirect = b.get(f"/v1/videos/{vid}/content", follow_redirects=False)
    assert redirect.status_code == 307
    assert httpx.get(redirect.headers["location"]).content == streamed.content
    assert a.get(f"/v1/videos/{vid}/content", params={"variant": "thumbnail"}).content[:4] == b"RIFF"

    fs = fsspec.filesystem("s3")
    key = f"{storage_url}/videos/{vid}.mp4"
    assert fs.cat_file(key) == streamed.content
    assert not list((rt_a.settings.storage_dir / "videos").glob("video_*"))
    assert b.delete(f"/v1/videos/{vid}").status_code == 200
    assert not fs.exists(key) and not fs.exists(key.replace(".mp4", ".webp"))


def test_a_synchronous_generate_answers_when_another_replica_ran_the_job(runtime_with, database_url):
    """``POST /generate`` on a busy replica: the idle one runs the job, and the busy one answers with the video as soon
    as it is done (it watches the jobs it waits on, wherever they run)."""
    common = {"database_url": database_url, "max_batch_size": 1}
    a, rt_a, _ = runtime_with({"step_s": 0.5}, replica_id="a", **common)
    long_job = _job(a)  # 8 steps of 0.5 s: replica a is busy for about 4 s
    wait_status(a, long_job, ("in_progress",), timeout=30)
    runtime_with(None, replica_id="b", **common)
    t0 = time.time()
    r = a.post("/generate", json={"prompt": "cells dividing", "height": 32, "width": 32, "num_frames": 5,
                                  "num_inference_steps": 2})  # fmt: skip
    elapsed = time.time() - t0
    assert r.status_code == 200 and r.content[4:8] == b"ftyp", r.text[:300]
    ran_on = rt_a.store._all("SELECT status FROM jobs WHERE id=%s", (r.headers["X-Job-Id"],))
    assert ran_on[0]["status"] == "completed"
    assert a.get(f"/v1/videos/{long_job}").json()["status"] == "in_progress" and elapsed < 4, elapsed
