"""Faults and backpressure: disk full, model load failure, out of memory, graceful shutdown,
a full queue, per-key limits, timeouts and the API key; each on both job stores (embedded SQLite, and PostgreSQL,
which several replicas share)."""

import errno
import time

import httpx
import pytest

from tests.conftest import wait_status


@pytest.fixture(params=["sqlite", "postgres"], autouse=True)
def job_backend(request, monkeypatch) -> str:
    """Every runtime and server of the test uses this job store (PostgreSQL through the environment)."""
    if request.param == "postgres":
        monkeypatch.setenv("MICROVERSE_DATABASE_URL", request.getfixturevalue("database_url"))
    return request.param

SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
V1_SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}


def test_disk_full_fails_the_job_with_a_reason_and_the_service_stays_up(runtime_with, monkeypatch):
    client, rt, _ = runtime_with(storage_retry_s=0.5)  # a disk that stays full: the job fails after the retries
    real_write = rt.store.write_file

    def full(job_id, suffix, data):
        raise OSError(errno.ENOSPC, "No space left on device", f"{job_id}{suffix}")

    monkeypatch.setattr(rt.store, "write_file", full)
    vid = client.post("/v1/videos", json={"prompt": "a cell", **V1_SMALL}).json()["id"]
    v = wait_status(client, vid, ("failed", "completed"))
    assert v["status"] == "failed" and v["error"]["code"] == "storage_error"
    assert "No space left on device" in v["error"]["message"]
    monkeypatch.setattr(rt.store, "write_file", real_write)
    ok = client.post("/generate", json={"prompt": "a cell", **SMALL})
    assert ok.status_code == 200 and ok.headers["content-type"] == "video/mp4"


def test_out_of_memory_batch_is_split_and_retried(runtime_with):
    client, _rt, engine = runtime_with({"step_s": 0.05, "oom_above": 1}, max_batch_wait_ms=1500)
    bodies = [{"prompt": f"cell {i}", "seed": i, **V1_SMALL} for i in range(3)]
    ids = [client.post("/v1/videos", json=body).json()["id"] for body in bodies]
    for vid in ids:
        assert wait_status(client, vid, ("completed", "failed"))["status"] == "completed"
    assert engine.batch_sizes[0] == 3 and engine.batch_sizes[1:] == [1, 1, 1]


def test_out_of_memory_alone_fails_with_a_hint_and_serving_continues(runtime_with):
    client, _rt, engine = runtime_with({"oom_above": 0})
    vid = client.post("/v1/videos", json={"prompt": "a cell", **V1_SMALL}).json()["id"]
    v = wait_status(client, vid, ("failed", "completed"))
    assert v["status"] == "failed" and "out of memory" in v["error"]["message"]
    assert "MICROVERSE_OFFLOAD" in v["error"]["message"]
    engine.oom_above = None
    assert client.post("/generate", json={"prompt": "a cell", **SMALL}).status_code == 200


def test_graceful_shutdown_requeues_the_running_job(runtime_with, make_settings):
    client, rt, _ = runtime_with({"step_s": 0.2})
    vid = client.post("/v1/videos", json={"prompt": "a cell", **V1_SMALL, "num_inference_steps": 50}).json()["id"]
    wait_status(client, vid, ("in_progress",))
    t0 = time.time()
    rt.stop()
    assert time.time() - t0 < 5
    from microverse.runtime import open_store

    job = open_store(rt.settings).get(vid)  # the store as the next start opens it
    assert job.status == "queued" and job.attempts == 0

    client2, _, _ = runtime_with()
    assert wait_status(client2, vid, ("completed", "failed"), timeout=120)["status"] == "completed"


def test_full_queue_answers_429_with_retry_after(runtime_with):
    client, _rt, _ = runtime_with({"step_s": 0.3}, max_queue=2)
    body = {"prompt": "a cell", **V1_SMALL, "num_inference_steps": 20}
    first = [client.post("/v1/videos", json=body) for _ in range(2)]
    assert all(r.status_code == 200 for r in first)
    third = client.post("/v1/videos", json=body)
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert third.json()["error"]["code"] == "queue_full" and third.json()["error"]["type"] == "rate_limit_error"
    for r in first:
        client.delete(f"/v1/videos/{r.json()['id']}")


def test_per_key_concurrency_limit(runtime_with):
    """Without a configured key every caller is one anonymous tenant: the header changes neither whose jobs they
    see nor the limit they share (varying it cannot bypass the limit)."""
    client, _rt, _ = runtime_with({"step_s": 0.3}, max_active_per_key=1)
    body = {"prompt": "a cell", **V1_SMALL, "num_inference_steps": 20}
    a = client.post("/v1/videos", json=body, headers={"Authorization": "Bearer key-a"})
    b = client.post("/v1/videos", json=body, headers={"Authorization": "Bearer key-b"})
    assert a.status_code == 200
    assert b.status_code == 429 and "retry-after" in b.headers
    assert b.json()["error"]["code"] == "too_many_active_jobs"
    assert client.get(f"/v1/videos/{a.json()['id']}", headers={"Authorization": "Bearer key-b"}).status_code == 200


def test_generate_timeout_is_a_504_naming_the_job(runtime_with):
    client, _rt, _ = runtime_with({"step_s": 0.2}, request_timeout_s=0.5)
    r = client.post("/generate", json={"prompt": "a cell", **SMALL, "num_inference_steps": 20})
    assert r.status_code == 504 and "video_" in r.json()["error"]["message"]


def test_api_key_protects_every_route_but_health(start_server):
    server = start_server(MICROVERSE_API_KEY="s3cret")
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    ui = httpx.get(server.url + "/ui")  # the playground page itself holds no data; it asks for the key
    assert ui.status_code == 200 and "api-key" in ui.text
    for method, path in (("GET", "/info"), ("GET", "/v1/videos"), ("POST", "/generate"), ("POST", "/judge")):
        r = httpx.request(method, server.url + path, json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    assert httpx.get(server.url + "/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_model_load_failure_keeps_the_service_up_but_not_ready(tmp_path):
    from tests.conftest import Server

    server = Server({"MICROVERSE_MODEL": str(tmp_path / "no-such-model"), "MICROVERSE_CACHE_DIR": str(tmp_path)},
                    tmp_path / "server.log")
    try:
        with pytest.raises(RuntimeError, match="not ready"):
            server.start(timeout=25)
        assert httpx.get(server.url + "/livez").status_code == 200
        assert httpx.get(server.url + "/readyz").status_code == 503
        info = httpx.get(server.url + "/info").json()
        assert info["ready"] is False and "no-such-model" in info["load_error"]
        r = httpx.post(server.url + "/generate", json={"prompt": "a cell"})
        assert r.status_code == 503 and "no-such-model" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_cors_is_off_by_default_and_follows_the_setting(start_server, microverse_server):
    preflight = {"Origin": "https://lab.example.org", "Access-Control-Request-Method": "POST"}
    off = httpx.options(microverse_server + "/v1/videos", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    server = start_server(MICROVERSE_CORS_ORIGINS="https://lab.example.org")
    on = httpx.options(server.url + "/v1/videos", headers=preflight)
    assert on.headers.get("access-control-allow-origin") == "https://lab.example.org"
    other = httpx.options(server.url + "/v1/videos", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("redact", [False, True])
def test_prompts_are_redacted_from_logs_when_configured(make_client, caplog, redact):
    import logging

    client = make_client(redact_prompts=redact)
    with caplog.at_level(logging.INFO, logger="microverse.submission"):
        assert client.post("/generate", json={"prompt": "patient 1234 biopsy", **SMALL}).status_code == 200
    queued = [r.getMessage() for r in caplog.records if "queued" in r.getMessage()]
    assert len(queued) == 1
    assert ("patient 1234 biopsy" in queued[0]) is (not redact)
    assert ("prompt redacted: sha256" in queued[0]) is redact
