"""The durable job store: persistence, recovery after a crash, expiry, corrupted records."""

import json
import time

from microverse.schemas import GenerationSpec
from tests.conftest import raw_sql

SPEC = GenerationSpec(prompt="p", negative_prompt="", height=32, width=32, num_frames=5, num_inference_steps=2,
                      guidance_scale=5.0, seed=1, fps=8)


def test_job_survives_reopen_and_interrupted_jobs_are_requeued_then_failed(open_job_store):
    store = open_job_store(retention_s=60, max_attempts=2)
    job = store.create(SPEC, "m")
    assert store.claim_batch(SPEC.batch_key, 4)[0].id == job.id
    store.close()  # "crash" while in progress

    store = open_job_store(retention_s=60, max_attempts=2)
    assert store.recover() == {"requeued": 1, "failed": 0}
    assert store.get(job.id).status == "queued"
    store.claim_batch(SPEC.batch_key, 4)
    store.close()  # second crash: out of attempts

    store = open_job_store(retention_s=60, max_attempts=2)
    assert store.recover() == {"requeued": 0, "failed": 1}
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error_code == "interrupted" and "2 time" in failed.error_message


def test_claim_batch_only_takes_compatible_jobs_oldest_first(open_job_store):
    store = open_job_store()
    a, b = store.create(SPEC, "m"), store.create(SPEC, "m")
    other = store.create(GenerationSpec(**{**SPEC.__dict__, "height": 48}), "m")
    batch = store.claim_batch(SPEC.batch_key, 4)
    assert [j.id for j in batch] == [a.id, b.id]
    assert store.get(other.id).status == "queued"


def test_expired_jobs_and_files_are_deleted(open_job_store):
    store = open_job_store(retention_s=1)
    job = store.create(SPEC, "m")
    store.claim_batch(SPEC.batch_key, 1)
    store.video_path(job.id).write_bytes(b"mp4")
    store.thumb_path(job.id).write_bytes(b"img")
    assert store.complete(job.id, {})
    assert store.expire(now=time.time()) == 0
    assert store.expire(now=time.time() + 5) == 1
    assert store.get(job.id) is None and not store.video_path(job.id).exists() and not store.thumb_path(job.id).exists()


def test_corrupted_record_is_failed_with_a_reason_not_fatal(open_job_store):
    store = open_job_store()
    bad, good = store.create(SPEC, "m"), store.create(SPEC, "m")
    raw_sql(store, "UPDATE jobs SET spec='{broken' WHERE id=?", (bad.id,))
    assert store.oldest_queued().id == good.id
    row = raw_sql(store, "SELECT status, error_code FROM jobs WHERE id=?", (bad.id,))[0]
    assert (row["status"], row["error_code"]) == ("failed", "corrupted_record")


def test_pagination(open_job_store):
    store = open_job_store()
    ids = [store.create(SPEC, "m").id for _ in range(5)]
    page1 = store.list(limit=2, order="asc")
    page2 = store.list(limit=2, order="asc", after=page1[-1].id)
    assert [j.id for j in page1 + page2] == ids[:4]
    assert [j.id for j in store.list(limit=10)] == ids[::-1]


def test_jobs_queued_by_an_older_version_get_todays_batch_key_at_start(open_job_store):
    """A batch key that gained fields (the adapter) must not strand the jobs queued under the old one."""
    store = open_job_store()
    job = store.create(SPEC, "m")
    old_key = json.dumps(list(SPEC.batch_key)[:7])
    raw_sql(store, "UPDATE jobs SET batch_key=? WHERE id=?", (old_key, job.id))
    store.close()
    store = open_job_store()
    store.recover()
    assert [j.id for j in store.claim_batch(SPEC.batch_key, 4)] == [job.id]
