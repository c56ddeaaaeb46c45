"""Stopping ``microverse serve`` stops everything it started (issue 20, item 7).

Both attacks run the real CLI on the tiny checkpoint while a slow job runs: a SIGTERM to the CLI, and a
kill -9 of its process group (which never reaches BentoML's worker: that runs in a session of its own, see
:mod:`microverse.lifecycle`). Each time every process of the server ends within the grace period, the port
can be bound again, the running job is back in the queue, and a restart on the same port and storage
completes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from microverse.lifecycle import ParentWatchdog
from microverse.tools.service_process import (
    REPO_ROOT,
    free_port,
    kill_processes,
    process_tree,
    spawn_service,
    stop_service,
    wait_ready,
)
from tests.conftest import wait_completed

GRACE_S = 30.0
"""How long a stop may take, from the signal until the port is free and no process of the server is left."""


@dataclass
class CliServer:
    """A ``microverse serve`` started by :func:`serve_cli`."""

    proc: subprocess.Popen
    """The CLI, which became the BentoML server (``exec``)."""
    port: int
    """Its port on 127.0.0.1."""
    tree: list[psutil.Process]
    """The CLI and all its descendants once ready (BentoML's worker among them)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def serve_cli(tmp_path, tiny_model_dir):
    """Factory: start ``microverse serve`` on the tiny checkpoint (storage under ``tmp_path``, shared by every
    server of a test); at the end, stop each one and SIGKILL whatever any of them started that still runs."""
    env = {"MICROVERSE_MODEL": str(tiny_model_dir), "MICROVERSE_STORAGE_DIR": str(tmp_path / "storage"),
           "MICROVERSE_CACHE_DIR": str(tmp_path / "cache")}
    procs: list[subprocess.Popen] = []
    seen: list[psutil.Process] = []

    def start(port: int | None = None) -> CliServer:
        port = port or free_port()
        log = tmp_path / f"serve{len(procs)}.log"
        proc = spawn_service(env, port, log, cli=True)
        procs.append(proc)
        try:
            wait_ready(proc, port, log)
        finally:
            seen.extend(process_tree(proc.pid))
        return CliServer(proc, port, process_tree(proc.pid))

    yield start
    for proc in procs:
        stop_service(proc, grace=20)
    kill_processes(seen)


def start_slow_job(url: str) -> str:
    """Create a job long enough to be interrupted and return its id once it is running."""
    body = {"prompt": "apoptosis", "size": "128x128", "num_frames": 33, "num_inference_steps": 100, "seed": 3}
    response = httpx.post(url + "/v1/videos", json=body, timeout=30)
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        video = httpx.get(f"{url}/v1/videos/{job_id}", timeout=10).json()
        if video["status"] == "in_progress" and video["progress"] > 0:
            return job_id
        time.sleep(0.02)
    raise AssertionError(f"the job never ran: {video}")


def job_status(storage: Path, job_id: str) -> str:
    """The job's status as stored in the database (read directly: no server runs)."""
    with contextlib.closing(sqlite3.connect(storage / "jobs.sqlite3")) as db:
        (status,) = db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
    return status


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (bound as BentoML binds it, with SO_REUSEADDR, so the
    TIME_WAIT of closed connections does not count; a process still listening does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that still run (a zombie left for a reaper that does not reap has ended)."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def wait_stopped(server: CliServer, t0: float) -> float:
    """Wait until no process of ``server`` runs and its port is free; return the seconds since ``t0``."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(GRACE_S)
    while time.monotonic() - t0 < GRACE_S:
        if not still_running(server.tree) and port_is_free(server.port):
            return time.monotonic() - t0
        time.sleep(0.1)
    alive = [p.pid for p in still_running(server.tree)]
    raise AssertionError(f"{GRACE_S:.0f} s after the signal: pids {alive} still run, "
                         f"port {'free' if port_is_free(server.port) else 'in use'}")


def assert_restart_completes(serve_cli, server: CliServer, storage: Path, job_id: str) -> None:
    assert job_status(storage, job_id) == "queued"
    restarted = serve_cli(port=server.port)  # the same port: no EADDRINUSE
    video = wait_completed(restarted.url, job_id)
    assert video["status"] == "completed", video
    assert httpx.get(f"{restarted.url}/v1/videos/{job_id}/content", timeout=30).status_code == 200


def test_sigterm_to_the_cli_frees_the_port_and_requeues_the_job(serve_cli, tmp_path):
    server = serve_cli()
    assert len(server.tree) >= 2, server.tree  # the server and its worker
    job_id = start_slow_job(server.url)

    t0 = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    elapsed = wait_stopped(server, t0)
    print(f"SIGTERM: {len(server.tree)} processes gone and port free in {elapsed:.1f} s")

    assert_restart_completes(serve_cli, server, tmp_path / "storage", job_id)


def test_kill_9_of_the_cli_group_ends_the_worker_too(serve_cli, tmp_path):
    server = serve_cli()
    group = os.getpgid(server.proc.pid)
    outside = [p for p in server.tree if os.getpgid(p.pid) != group]
    assert outside, "every process of the server is in the CLI's group: this test no longer covers an orphan"
    job_id = start_slow_job(server.url)

    t0 = time.monotonic()
    os.killpg(group, signal.SIGKILL)
    elapsed = wait_stopped(server, t0)
    print(f"kill -9 of the group: {len(outside)} worker(s) outside it gone and port free in {elapsed:.1f} s")

    assert_restart_completes(serve_cli, server, tmp_path / "storage", job_id)


# -- the watchdog alone: a parent killed with SIGKILL, a child in a session of its own -----------------------

CHILD = textwrap.dedent("""
    import os, pathlib, signal, sys, threading, time
    from microverse.lifecycle import ParentWatchdog

    out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    stop = lambda: (out / "stopped_by").write_text(threading.current_thread().name)
    watchdog = ParentWatchdog(stop, interval=0.05, grace=1.0)
    if mode == "graceful":  # what uvicorn does on SIGTERM, then BentoML's shutdown hook
        signal.signal(signal.SIGTERM, lambda *_: (watchdog.shutdown(), sys.exit(0)))
    else:  # a graceful shutdown that never ends (an in-flight request uvicorn waits for)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watchdog.start()
    (out / "pid.tmp").write_text(str(os.getpid()))
    os.replace(out / "pid.tmp", out / "pid")
    time.sleep(600)
""")
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
    time.sleep(600)
""")


@pytest.mark.parametrize(("mode", "stopped_by"), [("graceful", "MainThread"), ("stuck", "parent-watchdog")])
def test_the_watchdog_stops_an_orphan(tmp_path, mode, stopped_by):
    """Graceful: the watchdog's SIGTERM runs the shutdown hook. Stuck: after ``grace`` the watchdog stops the
    runtime itself and exits."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(tmp_path), mode], cwd=REPO_ROOT,
                              start_new_session=True)
    child: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        child.append(psutil.Process(int((tmp_path / "pid").read_text())))
        assert child[0].ppid() == parent.pid
        assert not (tmp_path / "stopped_by").exists()

        t0 = time.monotonic()
        parent.kill()
        parent.wait(10)
        while still_running(child) and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        assert not still_running(child), f"the orphan still runs {elapsed:.1f} s after its parent was killed"
        assert (tmp_path / "stopped_by").read_text() == stopped_by
        if mode == "stuck":
            assert elapsed >= 1.0, elapsed  # it waited out the grace period
    finally:
        kill_processes([*child, *process_tree(parent.pid)])
        with contextlib.suppress(subprocess.TimeoutExpired):
            parent.wait(10)


def test_the_runtime_stops_once_whoever_asks():
    calls = []
    watchdog = ParentWatchdog(lambda: calls.append(1))  # never started: nothing watches
    watchdog.shutdown()
    watchdog.shutdown(timeout=1)
    assert calls == [1]
