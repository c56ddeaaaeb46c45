"""Shared fixtures: tiny seeded Wan checkpoints, in-process apps, and a real ``bentoml serve``."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
