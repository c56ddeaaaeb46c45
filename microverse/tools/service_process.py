"""A ``bentoml serve microverse.service:MicroVerse`` subprocess on loopback, for tests, benches and load tests.

BentoML starts each worker in a process group of its own, so signalling the server's group alone would
orphan the workers (a worker left behind keeps its port, its GPU and its job): every signal here goes to
the groups of the whole process tree. Once the server itself is gone its workers are no longer in its tree
(they stop themselves, :mod:`microverse.lifecycle`): take a :func:`process_tree` while it runs and
:func:`kill_processes` it at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import httpx
import psutil

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout root: the service starts there, so a checkout's own files are the ones served."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_service(env: dict[str, str], port: int, log: Path, cli: bool = False) -> subprocess.Popen:
    """Start the service on ``127.0.0.1:port`` with ``env`` on top of this process's environment, output
    appended to ``log`` (see :func:`wait_ready`); with ``cli``, as ``microverse serve`` (which becomes the
    BentoML server) rather than ``bentoml serve``."""
    server = ["microverse.cli", "serve"] if cli else ["bentoml", "serve", "microverse.service:MicroVerse"]
    cmd = [sys.executable, "-m", *server, "--port", str(port), "--host", "127.0.0.1"]
    with open(log, "ab") as log_file:  # the service writes to its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180.0) -> None:
    """Return once ``/readyz`` answers 200; raise ``RuntimeError`` (with the log's tail) if the service exits
    or is not ready in ``timeout`` seconds. Stopping it is the caller's job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants now (empty once it is gone). Each remembers its start time, so a
    later signal through it never reaches a reused pid."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_processes(procs: Iterable[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """SIGKILL those of ``procs`` still running, and their descendants, and wait for them; returns those that
    were still running."""
    alive = {}
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running():
                for p in [proc, *proc.children(recursive=True)]:
                    alive[p.pid] = p
    for proc in alive.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive.values(), timeout=timeout)
    return list(alive.values())


def _process_groups(pid: int) -> set[int]:
    """Process groups of ``pid`` and all its descendants (empty once it is gone)."""
    groups = set()
    for proc in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(proc.pid))
    return groups


def _signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)


def kill_service(proc: subprocess.Popen) -> None:
    """SIGKILL the service and every worker (a crash, not a shutdown) and reap it."""
    _signal_groups(_process_groups(proc.pid), signal.SIGKILL)
    proc.wait(10)


def stop_service(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the service and its workers; SIGKILL whatever of them still runs after ``grace`` seconds."""
    groups = _process_groups(proc.pid)
    _signal_groups(groups, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        logger.warning("the service did not stop in %.0f s: killing it", grace)
    _signal_groups({g for g in groups if _group_alive(g)}, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
