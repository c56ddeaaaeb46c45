"""Callers and bodies (issue 20): without an API key every caller is one anonymous tenant, with one only its jobs
are visible (``/judge`` included); the key guards BentoML's own routes too; body limits hold while the body
streams in, chunked or not; over-deep JSON is a 400 naming the body."""

import asyncio
import threading
import time
from collections.abc import Iterable

import httpx
import pytest
from fastapi.testclient import TestClient

import microverse.routers.judge as judge_router
from evaluation.fake_judge import FakeJudgeServer
from evaluation.judge import JudgeConfig
from evaluation.judge_api import JudgeService
from microverse.api import create_app
from microverse.config import Settings
from microverse.deps import MAX_JSON_DEPTH, BodyRules
from microverse.engine import DiffusersEngine
from microverse.runtime import Runtime

VIDEO = {"prompt": "a cell divides", "size": "64x64", "num_frames": 5, "num_inference_steps": 2}
ALICE, BOB, CAROL = ({"Authorization": f"Bearer {name}"} for name in ("alice", "bob", "carol"))
NOBODY: dict[str, str] = {}


class GatedEngine:
    """The tiny engine, shared by every runtime of this module (one batch at a time), holding each batch until
    ``gate`` is set."""

    lock = threading.Lock()

    def __init__(self, engine: DiffusersEngine) -> None:
        self.inner, self.model, self.choice = engine, engine.model, engine.choice
        self.gate = threading.Event()
        self.gate.set()

    def generate(self, specs, on_step=None, should_cancel=None):
        self.gate.wait(120)
        with self.lock:
            return self.inner.generate(specs, on_step=on_step, should_cancel=should_cancel)


@pytest.fixture(scope="module")
def start(tmp_path_factory, tiny_model_dir, bench_dir):
    """Factory: an in-process app on a started Runtime (storage folder ``storage``, gated engine, fake judge) ->
    (client, runtime, engine); every runtime is stopped at the end."""
    tmp = tmp_path_factory.mktemp("auth")
    made: list[tuple[Runtime, GatedEngine]] = []
    engine = None
    with FakeJudgeServer() as judge_server:

        def make(storage: str, **overrides) -> tuple[TestClient, Runtime, GatedEngine]:
            nonlocal engine
            settings = Settings(model=str(tiny_model_dir), storage_dir=tmp / storage, max_batch_wait_ms=0,
                                **overrides)
            engine = engine or DiffusersEngine.from_settings(settings)
            gated = GatedEngine(engine)
            app = create_app()
            rt = app.state.runtime = Runtime.start(settings, engine=gated)
            rt.judge = JudgeService(JudgeConfig(base_url=judge_server.base_url, api_key="x", model="fake-judge"),
                                    benchmark=bench_dir)
            made.append((rt, gated))
            return TestClient(app, raise_server_exceptions=False), rt, gated

        yield make
        for rt, gated in made:
            gated.gate.set()
            rt.stop()


@pytest.fixture(scope="module")
def anon(start):
    """No API key; two active jobs at most (for all callers together)."""
    return start("anon", max_active_per_key=2)


def finished(client: TestClient, headers: dict[str, str], timeout: float = 120) -> str:
    """Make a video as ``headers``' caller and wait for it; its id."""
    resp = client.post("/v1/videos", json=VIDEO, headers=headers)
    assert resp.status_code == 200, resp.text
    vid = resp.json()["id"]
    deadline = time.time() + timeout
    while (status := client.get(f"/v1/videos/{vid}", headers=headers).json()["status"]) != "completed":
        assert status in ("queued", "in_progress") and time.time() < deadline, status
        time.sleep(0.05)
    return vid


def listed(client: TestClient, headers: dict[str, str]) -> set[str]:
    return {v["id"] for v in client.get("/v1/videos?limit=100", headers=headers).json()["data"]}


# -- item 3: owner scoping ------------------------------------------------------------------------------------


def test_without_a_key_every_caller_is_one_tenant_whatever_it_sends(anon):
    client, rt, _ = anon
    vid = finished(client, ALICE)
    assert rt.store.get(vid).owner is None, "the Authorization header must not become an owner"
    for headers in (BOB, NOBODY):
        assert client.get(f"/v1/videos/{vid}", headers=headers).status_code == 200
        assert vid in listed(client, headers)
        content = client.get(f"/v1/videos/{vid}/content", headers=headers)
        assert content.status_code == 200 and content.content[4:8] == b"ftyp"
        judged = client.post("/judge", json={"job_id": vid, "task_index": 1}, headers=headers)
        assert judged.status_code == 200, judged.text
    assert client.delete(f"/v1/videos/{vid}", headers=NOBODY).json()["deleted"] is True
    assert client.get(f"/v1/videos/{vid}", headers=ALICE).status_code == 404


def test_without_a_key_varying_the_header_does_not_lift_the_active_limit(anon):
    client, _rt, engine = anon
    engine.gate.clear()  # the first job holds the engine: both jobs stay active
    made = [client.post("/v1/videos", json=VIDEO, headers=h) for h in (ALICE, BOB)]
    try:
        assert [r.status_code for r in made] == [200, 200]
        for headers in (CAROL, NOBODY, ALICE):
            refused = client.post("/v1/videos", json=VIDEO, headers=headers)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_active_jobs"
    finally:
        engine.gate.set()
        for r in made:
            client.delete(f"/v1/videos/{r.json()['id']}")


@pytest.fixture(scope="module")
def rotated(start):
    """A store holding a finished video made under the key ``k0``, now served with the key ``k1`` ->
    (client, runtime, the ``k0`` video's id)."""
    client, rt, _ = start("rotated", api_key="k0")
    old = finished(client, {"Authorization": "Bearer k0"})
    rt.stop()
    client, rt, _ = start("rotated", api_key="k1")
    return client, rt, old


def test_with_a_key_another_keys_jobs_are_not_found_anywhere(rotated):
    client, rt, old = rotated
    k1 = {"Authorization": "Bearer k1"}
    own = finished(client, k1)
    for path in (f"/v1/videos/{old}", f"/v1/videos/{old}/content"):
        assert client.get(path, headers=k1).status_code == 404, path
    assert client.delete(f"/v1/videos/{old}", headers=k1).status_code == 404
    assert rt.store.get(old) is not None, "a refused delete must not delete"
    assert listed(client, k1) == {own}
    judged = client.post("/judge", json={"job_id": old, "task_index": 1}, headers=k1)
    assert judged.status_code == 404 and judged.json()["error"]["param"] == "job_id", judged.text
    assert client.post("/judge", json={"job_id": own, "task_index": 1}, headers=k1).status_code == 200
    assert client.get(f"/v1/videos/{own}/content", headers=k1).status_code == 200
    assert client.get("/v1/videos", headers={"Authorization": "Bearer k0"}).status_code == 401


# -- item 4: the key in front of BentoML's own routes (a real server) ------------------------------------------


def test_the_key_guards_the_routes_bentoml_serves_itself(start_server):
    origin = "http://ui.example"
    server = start_server(MICROVERSE_API_KEY="s3cret", MICROVERSE_CORS_ORIGINS=origin)
    key = {"Authorization": "Bearer s3cret"}
    for path in ("/metrics", "/docs.json", "/schema.json", "/", "/info", "/openapi.json"):
        for headers in (NOBODY, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(server.url + path, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code, r.text[:200])
            assert r.json()["error"] == {"message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                         "type": "authentication_error", "param": None, "code": "invalid_api_key"}
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + path, headers=key).status_code == 200, path
    assert "microverse_" in httpx.get(server.url + "/metrics", headers=key).text
    for probe in ("/livez", "/readyz", "/healthz"):
        assert httpx.get(server.url + probe).status_code == 200, probe
    preflight = httpx.options(server.url + "/v1/videos", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin


# -- item 5: body limits while streaming ---------------------------------------------------------------------


def post_streamed(client: TestClient, path: str, chunks: Iterable[bytes],
                  headers: dict[str, str]) -> tuple[httpx.Response, int]:
    """POST ``chunks`` in-process, each pulled only when the app asks for more (chunked unless ``headers`` give a
    Content-Length) -> (the response, how many bytes the app pulled)."""
    pulled = 0

    async def body():
        nonlocal pulled
        for chunk in chunks:
            pulled += len(chunk)
            yield chunk

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post(path, content=body(), headers=headers)

    return asyncio.run(post()), pulled


def endless(head: bytes, chunk: int, total: int) -> Iterable[bytes]:
    yield head
    for _ in range(total // chunk):
        yield b"x" * chunk


JSON = {"content-type": "application/json"}
BOUNDARY = "limitboundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
FILE_HEAD = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n'
             "Content-Type: video/mp4\r\n\r\n").encode()


def test_a_chunked_json_body_is_refused_once_past_the_limit(anon):
    client, _rt, _ = anon
    resp, pulled = post_streamed(client, "/v1/videos", endless(b'{"prompt": "', 8192, 8 << 20), JSON)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large", resp.text
    assert pulled <= 64 * 1024 + 8192, pulled


def test_a_chunked_urlencoded_body_is_refused_once_past_the_limit(anon):
    client, _rt, _ = anon
    resp, pulled = post_streamed(client, "/v1/videos", endless(b"prompt=", 8192, 8 << 20),
                                 {"content-type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 413, resp.text
    assert pulled <= 64 * 1024 + 8192, pulled


def test_a_chunked_upload_to_judge_is_refused_once_past_the_limit(anon, monkeypatch):
    client, _rt, _ = anon
    limit = 1 << 20  # the real 200 MiB would take long to stream; the rule is the same
    monkeypatch.setattr(judge_router, "JUDGE_BODY", BodyRules(max_bytes=limit, upload="video",
                                                              json_fields=("rubric",)))
    resp, pulled = post_streamed(client, "/judge", endless(FILE_HEAD, 65536, 64 << 20), MULTIPART)
    assert resp.status_code == 413 and resp.json()["error"]["param"] == "video", resp.text
    assert pulled <= limit + 65536, pulled


@pytest.mark.parametrize("path,headers", [("/v1/videos", JSON), ("/generate", JSON), ("/judge", MULTIPART)])
def test_a_declared_length_over_the_limit_is_refused_before_reading(anon, path, headers):
    client, _rt, _ = anon
    resp, pulled = post_streamed(client, path, endless(b"", 65536, 1 << 20),
                                 {**headers, "content-length": str(300 << 20)})
    assert resp.status_code == 413 and pulled == 0, (resp.text, pulled)


def test_a_chunked_body_under_the_limit_still_works(anon):
    client, _rt, _ = anon
    body = b'{"prompt": "a cell divides", "size": "64x64", "num_frames": 5, "num_inference_steps": 2}'
    resp, _ = post_streamed(client, "/v1/videos", [body[i:i + 7] for i in range(0, len(body), 7)], JSON)
    assert resp.status_code == 200, resp.text
    client.delete(f"/v1/videos/{resp.json()['id']}")


# -- item 6: JSON nested too deep ----------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("body", [nested(5000), f'{{"prompt": {nested(5000)}}}',
                                  f'{{"prompt": "x", "seed": {nested(MAX_JSON_DEPTH)}}}'])
def test_over_deep_json_is_a_400_naming_the_body(anon, body):
    client, _rt, _ = anon
    for path in ("/v1/videos", "/generate", "/judge"):
        resp = client.post(path, content=body, headers=JSON)
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json()["error"]["param"] == "body" and "deeper than" in resp.json()["error"]["message"]


def test_over_deep_json_in_a_form_field_is_a_400_naming_it(anon):
    client, _rt, _ = anon
    resp = client.post("/judge", data={"task_index": "1", "rubric": f'{{"task": {nested(5000)}}}'})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "rubric", resp.text


def test_json_nested_up_to_the_limit_is_read(anon):
    client, _rt, _ = anon
    resp = client.post("/v1/videos", content=f'{{"prompt": "x", "seed": {nested(MAX_JSON_DEPTH - 1)}}}',
                       headers=JSON)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "seed", resp.text
