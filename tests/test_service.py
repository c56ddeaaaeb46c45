"""The real service (``bentoml serve``) driven as users drive it: the official ``openai`` client,
``/generate``, ``/metrics``, concurrency and batching, and a kill -9 in the middle of a job; each on both job stores
(the embedded SQLite database, and PostgreSQL, which several replicas share)."""

import re
import threading
import time
import warnings

import httpx
import numpy as np
import openai
import pytest

from media.video import read_video
from tests.conftest import Server, wait_in_progress

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def microverse_server(request, tmp_path_factory, tiny_model_dir):
    """A real service on the tiny checkpoint for the module, on each job store in turn; yields its base URL."""
    tmp = tmp_path_factory.mktemp(f"server-{request.param}")
    env = {"MICROVERSE_CACHE_DIR": str(tmp / "cache"), "MICROVERSE_STORAGE_DIR": str(tmp / "storage"),
           "MICROVERSE_MODEL": str(tiny_model_dir), "MICROVERSE_MAX_BATCH_WAIT_MS": "300"}  # fmt: skip
    if request.param == "postgres":
        postgres = request.getfixturevalue("postgres_server")
        postgres.reset()
        env["MICROVERSE_DATABASE_URL"] = postgres.url
    server = Server(env, tmp / "server.log")
    server.start()
    yield server.url
    server.stop()


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_openai_client_create_poll_download_list_delete(microverse_server, tmp_path):
    client = client_for(microverse_server)
    video = client.videos.create_and_poll(prompt="red blood cells flowing to the right", size="64x48",
                                          seconds="1", extra_body={"seed": 5, "num_inference_steps": 4})
    assert video.status == "completed" and video.progress == 100 and video.size == "64x48"
    content = client.videos.download_content(video.id)
    path = tmp_path / "v.mp4"
    content.write_to_file(path)
    frames, fps = read_video(path)
    assert frames.shape == (17, 48, 64, 3) and fps == 16  # 1 s at 16 fps -> nearest 4k+1 = 17 frames
    thumb = client.videos.download_content(video.id, variant="thumbnail").read()
    assert thumb[:4] == b"RIFF"  # webp

    ids = [v.id for v in client.videos.list(limit=100).data]
    assert video.id in ids
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_bad_size_is_a_400_in_openai_error_shape(microverse_server):
    with pytest.raises(openai.BadRequestError) as err:
        client_for(microverse_server).videos.create(prompt="a cell", size="100x100")
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == "height" and "multiple of 16" in body["message"]


def test_progress_rises_while_running(microverse_server):
    client = client_for(microverse_server)
    video = client.videos.create(prompt="particles diffusing", size="128x128",
                                 extra_body={"num_frames": 33, "num_inference_steps": 100, "seed": 1})
    seen = []
    deadline = time.time() + 300
    while time.time() < deadline:
        v = client.videos.retrieve(video.id)
        seen.append(v.progress)
        if v.status in ("completed", "failed"):
            break
        time.sleep(0.02)
    assert v.status == "completed"
    middle = sorted({p for p in seen if 0 < p < 100})
    assert len(middle) >= 2, seen
    assert seen == sorted(seen)


def test_same_seed_same_frames_through_both_apis(microverse_server):
    body = {"prompt": "a cell divides into two daughter cells", "seed": 11, "num_inference_steps": 4}
    a = httpx.post(microverse_server + "/generate", json=body, timeout=120)
    b = httpx.post(microverse_server + "/generate", json=body, timeout=120)
    c = httpx.post(microverse_server + "/generate", json={**body, "seed": 12}, timeout=120)
    assert a.headers["content-type"] == "video/mp4" and a.headers["x-seed"] == "11"
    assert "denoise;dur=" in a.headers["server-timing"]
    fa, fb, fc = (read_video(r.content)[0] for r in (a, b, c))
    np.testing.assert_array_equal(fa, fb)
    assert np.abs(fa.astype(int) - fc).mean() > 2

    client = client_for(microverse_server)
    v = client.videos.create_and_poll(prompt=body["prompt"], size="64x64",
                                      extra_body={"seed": 11, "num_inference_steps": 4, "num_frames": 17})
    fv = read_video(client.videos.download_content(v.id).read())[0]
    np.testing.assert_array_equal(fa, fv)


def test_four_concurrent_requests_are_batched_and_match_unbatched(microverse_server):
    prompts = ["a cell divides", "red blood cells flowing", "dna replication fork", "vesicle transport"]
    calls_before = metric(microverse_server, "microverse_batch_size_count")
    results = {}

    def post(i):
        results[i] = httpx.post(microverse_server + "/generate", timeout=300,
                                json={"prompt": prompts[i], "seed": 100 + i, "num_inference_steps": 6})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine_calls = metric(microverse_server, "microverse_batch_size_count") - calls_before
    assert all(r.status_code == 200 for r in results.values())
    assert engine_calls < 4, f"4 requests took {engine_calls} engine calls"
    assert max(int(r.headers["x-batch-size"]) for r in results.values()) >= 2
    for i, r in results.items():
        alone = httpx.post(microverse_server + "/generate", timeout=300,
                           json={"prompt": prompts[i], "seed": 100 + i, "num_inference_steps": 6})
        assert alone.headers["x-batch-size"] == "1"
        a, b = read_video(r.content)[0].astype(int), read_video(alone.content)[0].astype(int)
        # Same video up to last-bit float rounding of batched GEMMs (see test_engine).
        assert np.abs(a - b).mean() < 0.05, np.abs(a - b).mean()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_during_a_job_then_restart_completes_it(start_server, backend, request):
    env = {}
    if backend == "postgres":  # the restarted replica keeps its name: it takes its job back without waiting a lease
        env = {"MICROVERSE_DATABASE_URL": request.getfixturevalue("database_url"), "MICROVERSE_REPLICA_ID": "replica-a"}
    server = start_server(**env)
    client = client_for(server.url)
    video = client.videos.create(prompt="apoptosis", size="128x128",
                                 extra_body={"num_frames": 33, "num_inference_steps": 100, "seed": 3})
    wait_in_progress(client, video.id)
    server.kill9()

    server.start()  # same storage dir: the job is recovered and re-run
    client = client_for(server.url)
    v = client.videos.poll(video.id, poll_interval_ms=100)
    assert v.status == "completed", v
    frames, _ = read_video(client.videos.download_content(video.id).read())
    assert frames.shape == (33, 128, 128, 3)


def test_metrics_and_health(microverse_server):
    assert httpx.get(microverse_server + "/livez").status_code == 200
    assert httpx.get(microverse_server + "/readyz").status_code == 200
    text = httpx.get(microverse_server + "/metrics").text
    for name in ("microverse_generation_seconds_bucket", "microverse_batch_size_bucket", "microverse_queue_depth",
                 "microverse_steps_total"):
        assert name in text
