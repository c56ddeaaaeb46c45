"""Shared fixtures: tiny seeded Wan checkpoints, in-process apps, and a real ``bentoml serve``."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from microverse.tools.service_process import free_port, kill_service, spawn_service, stop_service, wait_ready
from tests.synthetic_microworldbench import write_microworldbench

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    """A synthetic MicroWorldBench folder (``tests/synthetic_microworldbench.py``); no test reads ``../shared``."""
    return write_microworldbench(tmp_path_factory.mktemp("microworldbench"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Wan pipeline saved with ``save_pretrained`` (what a user's checkpoint folder looks like)."""
    from microverse.tools.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-wan"))


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL (Debian's server programs) for the session; stopped at the end."""
    from microverse.tools.servers import Postgres

    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """moto's S3-protocol server for the session, with one bucket; stopped at the end."""
    from microverse.tools.servers import MotoS3

    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def storage_url(moto_s3, monkeypatch, request) -> str:
    """An ``s3://`` video store on the moto server (its own prefix per test), with the client environment set."""
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    return f"s3://{moto_s3.bucket}/{request.node.name[:40]}-{time.time_ns()}"


@pytest.fixture
def database_url(postgres_server) -> str:
    """The URL of an emptied PostgreSQL database (each test starts from no tables)."""
    postgres_server.reset()
    return postgres_server.url


@pytest.fixture(params=["sqlite", "postgres"])
def open_job_store(request, tmp_path):
    """Factory opening the job store of either backend on ``tmp_path`` (PostgreSQL: the same database each call, as
    the same replica, so a second call is that replica restarted); closes them all at the end."""
    from microverse.jobs import JobStore

    url = request.getfixturevalue("database_url") if request.param == "postgres" else None
    stores = []

    def open_store(retention_s: float = 60, max_attempts: int = 2, **pg):
        if url is None:
            store = JobStore(tmp_path, retention_s=retention_s, max_attempts=max_attempts)
        else:
            from microverse.pgjobs import PostgresJobStore

            pg = {"replica_id": "replica-a", **pg}
            store = PostgresJobStore(url, tmp_path, retention_s, max_attempts, **pg)
        stores.append(store)
        return store

    open_store.backend = request.param
    yield open_store
    for store in stores:
        store.close()


def raw_sql(store, sql: str, params: tuple = ()):
    """Run SQL written with ``?`` placeholders on either store's database (tests that corrupt rows); returns the rows
    (mappings by column name)."""
    if hasattr(store, "_execute"):
        return store._execute(sql, params).fetchall()
    return store._all(sql.replace("?", "%s"), params)


@pytest.fixture
def make_settings(tmp_path, tiny_model_dir):
    """Settings for an isolated runtime on the tiny checkpoint (overrides as keyword arguments)."""
    from microverse.config import Settings

    def make(**overrides):
        base = dict(model=str(tiny_model_dir), storage_dir=tmp_path / "storage", max_batch_wait_ms=0)
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
def make_client(make_settings):
    """In-process FastAPI client on a started Runtime; stops every runtime it made."""
    from fastapi.testclient import TestClient

    from microverse.api import create_app
    from microverse.runtime import Runtime

    runtimes = []

    def make(**overrides):
        app = create_app()
        app.state.runtime = Runtime.start(make_settings(**overrides))
        runtimes.append(app.state.runtime)
        return TestClient(app)

    yield make
    for rt in runtimes:
        rt.stop()


class Server:
    """A ``bentoml serve service:MicroVerse`` subprocess on loopback (``microverse.tools.service_process``)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> Server:
        self.proc = spawn_service(self.env, self.port, self.log_path)
        wait_ready(self.proc, self.port, self.log_path, timeout)
        return self

    def kill9(self) -> None:
        """SIGKILL the server and its workers (a crash, not a shutdown)."""
        kill_service(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_service(self.proc, grace=20)


@pytest.fixture
def start_server(tmp_path, tiny_model_dir):
    """Factory: start a real service (on the tiny checkpoint unless ``MICROVERSE_MODEL`` is given) with
    extra ``MICROVERSE_*`` env; all are stopped at the end."""
    servers = []

    def start(**env) -> Server:
        base = {"MICROVERSE_CACHE_DIR": str(tmp_path / "cache"), "MICROVERSE_STORAGE_DIR": str(tmp_path / "storage"),
                "MICROVERSE_MODEL": str(tiny_model_dir)}
        base.update({k: str(v) for k, v in env.items()})
        server = Server(base, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        return server.start()

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def microverse_server(tmp_path_factory, tiny_model_dir):
    """One real service on the tiny checkpoint for the whole session; yields its base URL.
    (The embedded default itself is served in ``test_demo_model.py``.)"""
    tmp = tmp_path_factory.mktemp("server")
    server = Server({"MICROVERSE_CACHE_DIR": str(tmp / "cache"), "MICROVERSE_STORAGE_DIR": str(tmp / "storage"),
                     "MICROVERSE_MODEL": str(tiny_model_dir),
                     "MICROVERSE_MAX_BATCH_WAIT_MS": "300"}, tmp / "server.log")
    server.start()
    yield server.url
    server.stop()


class SlowEngine:
    """The real engine, slowed down per step, optionally failing with out-of-memory."""

    def __init__(self, engine, step_s=0.0, oom_above=None):
        self.inner, self.step_s, self.oom_above = engine, step_s, oom_above
        self.model, self.choice = engine.model, engine.choice
        self.batch_sizes = []

    def generate(self, specs, on_step=None, should_cancel=None):
        self.batch_sizes.append(len(specs))
        if self.oom_above is not None and len(specs) > self.oom_above:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        def step(i, n):
            time.sleep(self.step_s)
            if on_step:
                on_step(i, n)

        return self.inner.generate(specs, on_step=step, should_cancel=should_cancel)


@pytest.fixture
def runtime_with(make_settings):
    """Start a Runtime on the tiny model with a wrapped engine; yields a factory (engine_kwargs, settings)."""
    from fastapi.testclient import TestClient

    from microverse.api import create_app
    from microverse.engine import DiffusersEngine
    from microverse.runtime import Runtime

    made = []

    def make(engine_kwargs=None, **settings):
        s = make_settings(**settings)
        engine = SlowEngine(DiffusersEngine.from_settings(s), **(engine_kwargs or {}))
        app = create_app()
        app.state.runtime = Runtime.start(s, engine=engine)
        made.append(app.state.runtime)
        return TestClient(app, raise_server_exceptions=False), app.state.runtime, engine

    yield make
    for rt in made:
        rt.stop()


def wait_status(client, vid, statuses, timeout=60):
    """Poll ``GET /v1/videos/{vid}`` until its status is one of ``statuses``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = client.get(f"/v1/videos/{vid}").json()
        if v["status"] in statuses:
            return v
        time.sleep(0.02)
    raise AssertionError(f"{vid} never reached {statuses}: {v}")


def wait_in_progress(client, video_id: str, timeout: float = 120.0):
    """Poll an openai client until the video is in progress with some progress (a job to kill mid-run); returns it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = client.videos.retrieve(video_id)
        if v.status == "in_progress" and v.progress > 0:
            return v
        time.sleep(0.02)
    raise AssertionError(f"video {video_id} never got under way: {v.status}")


def wait_completed(url: str, job_id: str, timeout: float = 600) -> dict:
    """Poll ``GET {url}/v1/videos/{job_id}`` over HTTP until the job is completed or failed; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = httpx.get(f"{url}/v1/videos/{job_id}", timeout=10).json()
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.2)
    raise AssertionError(f"the job did not finish in {timeout:.0f} s: {video}")
